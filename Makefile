# The test command (README.md): formatting, vet, the whole test suite, and
# the race detector over the concurrent packages in short mode.
GO ?= go
RACE_DIRS ?= blockdev journal exception snapshot clone nbd archive control

.PHONY: test fmt vet unit race lint bench report fuzz

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

# make fuzz: every fuzz target in the module for FUZZTIME each (one worker,
# FUZZPARALLEL to change it), then a table of execs, execs per second and
# crashers per target. A crasher is written by go test under the package's
# testdata/fuzz/TARGET, where it stays as a seed; the target fails the run.
# FUZZMINIMIZETIME bounds how long the engine minimises each new input:
# with go test's 60 s default, targets whose coverage varies with goroutine
# scheduling (the NBD server's) spent whole runs minimising, not fuzzing.
FUZZTIME ?= 60s
FUZZPARALLEL ?= 1
FUZZMINIMIZETIME ?= 1s

fuzz:
	@set -u; results=""; fails=0; \
	for file in $$(grep -rl --include='*_test.go' '^func Fuzz' . | sort); do \
	  pkg=./$$(dirname $${file#./}); \
	  for target in $$(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' $$file); do \
	    echo "== $$pkg $$target ($(FUZZTIME))"; \
	    log=$$(mktemp); \
	    $(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZETIME) -parallel $(FUZZPARALLEL) $$pkg >$$log 2>&1; rc=$$?; \
	    line=$$(grep -E 'fuzz: elapsed: [0-9]+s, execs: [0-9]+' $$log | tail -n 1); \
	    secs=$$(echo "$$line" | sed -n 's/.*elapsed: \([0-9]*\)s, execs: \([0-9]*\) .*/\1/p'); \
	    execs=$$(echo "$$line" | sed -n 's/.*elapsed: \([0-9]*\)s, execs: \([0-9]*\) .*/\2/p'); \
	    rate=$$([ -n "$$execs" ] && [ "$$secs" -gt 0 ] && echo $$((execs / secs))); \
	    crashers=0; \
	    if [ $$rc -ne 0 ]; then crashers=$$(grep -c 'Failing input written to' $$log); fails=$$((fails+1)); tail -n 30 $$log; fi; \
	    rm -f $$log; \
	    results="$$results$$(printf '%-28s %-20s %12s %10s %8s' $$pkg $$target "$${execs:-?}" "$${rate:-?}" $$crashers)\n"; \
	  done; \
	done; \
	printf '\n%-28s %-20s %12s %10s %8s\n' package target execs execs/s crashers; \
	printf "$$results"; \
	[ $$fails -eq 0 ]
