# The test command (README.md): formatting, vet, the whole test suite, and
# the race detector over the concurrent packages in short mode.
GO ?= go
RACE_DIRS ?= blockdev journal exception snapshot clone nbd

.PHONY: test fmt vet unit race lint bench report

test: fmt vet unit race

fmt:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

unit:
	$(GO) test -count=1 -timeout 20m ./...

race:
	$(GO) test -count=1 -race -short -timeout 20m $$(for d in $(RACE_DIRS); do [ -d $$d ] && echo ./$$d/...; done)

lint:
	staticcheck ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem -timeout 2h ./bench

report:
	$(GO) run ./bench/cmd/report -quick
