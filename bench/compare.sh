#!/usr/bin/env bash
# compare.sh: the engine=snapshot benchmarks of an older commit and of the
# current tree, side by side on this machine, back to back.
#
#   bench/compare.sh [-n ROUNDS] [-b REGEX] [-k] OLD [NEW]
#   bench/compare.sh -r DIR
#
# OLD and NEW are anything `git rev-parse` takes (main, HEAD~3, a hash). NEW
# defaults to the working tree as it is, uncommitted changes included. OLD
# (and NEW when given) is checked out in a temporary git worktree, removed
# on exit. Each side's bench test binary is built once; then, ROUNDS times,
# every benchmark group runs on one binary and at once on the other, the
# order alternating from round to round so that neither side always runs on
# a machine the other has just warmed or loaded. The table gives, per
# benchmark, the median over the rounds of each side's MB/s (or ops/s where
# a benchmark sets no bytes) and of its p99 latency, the ratio new/old of
# the medians (above 1 the new code is faster), and the median and range of
# the ratios of the two runs of each round, which shows how noisy the
# machine was.
#
#   -n ROUNDS   rounds (default 5)
#   -b REGEX    only the groups whose name matches REGEX (grep -E)
#   -k          keep the raw outputs (their directory is printed)
#   -r DIR      print the table again from the outputs kept in DIR; no runs
#
# The groups, each a `go test -bench` pattern and a -benchtime (the origin
# benchmarks do one 64 MiB pass per iteration; the random-I/O ones are
# timed over a count of 4 KiB operations). BENCHTIME_IO overrides the
# latter (default 100000x).
set -euo pipefail

usage() {
	awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
	exit 2
}
rounds=5
only=""
keep=0
reprint=""
while getopts "n:b:kr:" opt; do
	case $opt in
	n) rounds=$OPTARG ;;
	b) only=$OPTARG ;;
	k) keep=1 ;;
	r) reprint=$OPTARG ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
if [ -z "$reprint" ] && { [ $# -lt 1 ] || [ $# -gt 2 ]; }; then
	usage
fi
io=${BENCHTIME_IO:-100000x}
groups=(
	"OriginFirstWrite/engine=snapshot/ 1x"
	"OriginOverwrite/engine=snapshot/ 1x"
	"SnapshotRead/engine=snapshot/ $io"
	"ConcurrentWrite/engine=snapshot/ $io"
	"CloneRead/ $io"
)

# table DIR: the comparison of DIR/old.out and DIR/new.out.
table() {
	# Each result line: round, name, iterations, then value-unit pairs.
	awk '
	function speed(   i, mbs, ns) {
		for (i = 4; i < NF; i += 2) {
			if ($(i + 1) == "MB/s") mbs = $i
			if ($(i + 1) == "ns/op") ns = $i
		}
		if (mbs != "") return mbs
		if (ns > 0) return 1e9 / ns
		return ""
	}
	function p99(   i) {
		for (i = 4; i < NF; i += 2) if ($(i + 1) == "p99-ns") return $i
		return ""
	}
	function median(list,   a, n, i, j, t) {
		n = split(list, a, " ")
		for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
		if (n == 0) return ""
		if (n % 2) return a[(n + 1) / 2]
		return (a[n / 2] + a[n / 2 + 1]) / 2
	}
	{
		name = $2
		sub(/-[0-9]+$/, "", name)
		sub(/^Benchmark/, "", name)
		if (!(name in seen)) { seen[name] = 1; order[++n] = name }
		s = speed()
		if (s != "") { sp[FILENAME, name] = sp[FILENAME, name] " " s; per[FILENAME, name, $1] = s }
		if ($1 > rounds) rounds = $1
		p = p99(); if (p != "") lat[FILENAME, name] = lat[FILENAME, name] " " p
		for (i = 4; i < NF; i += 2) if ($(i + 1) == "MB/s") has[name] = 1
	}
	END {
		printf "%-44s %9s %9s %7s %15s %8s %8s %7s\n", "benchmark", "old", "new", "new/old", "pairs", "old p99", "new p99", "p99 n/o"
		for (k = 1; k <= n; k++) {
			name = order[k]
			o = median(sp[OLD, name]); w = median(sp[NEW, name])
			lo = median(lat[OLD, name]); ln = median(lat[NEW, name])
			r = (o > 0 && w != "") ? sprintf("%.2f", w / o) : "n/a"
			rl = (lo > 0 && ln != "") ? sprintf("%.2f", ln / lo) : "n/a"
			u = has[name] ? "MB/s" : "op/s"
			pairs = ""; lo2 = ""; hi2 = ""
			for (i = 1; i <= rounds; i++) {
				if (per[OLD, name, i] > 0 && per[NEW, name, i] != "") {
					q = per[NEW, name, i] / per[OLD, name, i]
					pairs = pairs " " q
					if (lo2 == "" || q < lo2) lo2 = q
					if (hi2 == "" || q > hi2) hi2 = q
				}
			}
			pr = pairs == "" ? "n/a" : sprintf("%.2f %.2f-%.2f", median(pairs), lo2, hi2)
			printf "%-44s %9s %9s %7s %15s %8s %8s %7s\n", name, fmt(o, u), fmt(w, u), r, pr, us(lo), us(ln), rl
		}
		print ""
		print "old, new: median MB/s (op/s where marked) over the rounds; new/old: their ratio, above 1"
		print "is faster; pairs: the median and range of the ratios of the runs made back to back in"
		print "each round (a wide range means a noisy machine); p99 in microseconds."
	}
	function fmt(v, u) {
		if (v == "") return "n/a"
		return sprintf("%.1f%s", v, u == "op/s" ? "op/s" : "")
	}
	function us(v) {
		if (v == "") return "n/a"
		return sprintf("%.1f", v / 1000)
	}
' OLD="$1/old.out" NEW="$1/new.out" "$1/old.out" "$1/new.out"
}

if [ -n "$reprint" ]; then
	table "$reprint"
	exit 0
fi

root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
old=$(git -C "$root" rev-parse --verify "$1^{commit}")
new=""
if [ $# -eq 2 ]; then
	new=$(git -C "$root" rev-parse --verify "$2^{commit}")
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/blocksnap-compare-XXXXXX")
worktrees=()
cleanup() {
	for w in "${worktrees[@]}"; do
		git -C "$root" worktree remove --force "$w" >/dev/null 2>&1 || true
	done
	git -C "$root" worktree prune >/dev/null 2>&1 || true
	if [ "$keep" = 1 ]; then
		rm -rf "$tmp/src-old" "$tmp/src-new"
		echo "raw outputs kept in $tmp" >&2
	else
		rm -rf "$tmp"
	fi
}
trap cleanup EXIT

# build SIDE REV|"": the bench test binary of REV (or of the working tree)
# as $tmp/SIDE.test.
build() {
	local side=$1 rev=$2 src=$root
	if [ -n "$rev" ]; then
		src=$tmp/src-$side
		git -C "$root" worktree add --detach --quiet "$src" "$rev"
		worktrees+=("$src")
	fi
	echo "building $side ($(git -C "$src" log -1 --format='%h %s' | cut -c1-70)$([ -z "$rev" ] && echo ', working tree'))" >&2
	(cd "$src" && go test -c -o "$tmp/$side.test" ./bench)
}
build old "$old"
build new "$new"

# run SIDE ROUND PATTERN BENCHTIME: one group on one side, appended to
# $tmp/SIDE.out with each result line tagged by the round.
run() {
	local side=$1 round=$2 pattern=$3 benchtime=$4
	(cd "$tmp" && "./$side.test" -test.run '^$' -test.bench "$pattern" -test.benchtime "$benchtime" \
		-test.benchmem -test.timeout 1h) 2>&1 | tee -a "$tmp/$side.log" |
		awk -v r="$round" '/^Benchmark/ { print r, $0 }' >>"$tmp/$side.out"
}

: >"$tmp/old.out"
: >"$tmp/new.out"
for ((i = 1; i <= rounds; i++)); do
	for g in "${groups[@]}"; do
		read -r pattern benchtime <<<"$g"
		if [ -n "$only" ] && ! grep -qE -- "$only" <<<"$pattern"; then
			continue
		fi
		echo "round $i/$rounds: $pattern" >&2
		if ((i % 2)); then
			run old "$i" "$pattern" "$benchtime"
			run new "$i" "$pattern" "$benchtime"
		else
			run new "$i" "$pattern" "$benchtime"
			run old "$i" "$pattern" "$benchtime"
		fi
	done
done

echo
echo "old: $(git -C "$root" log -1 --format='%h %s' "$old" | cut -c1-70)"
if [ -n "$new" ]; then
	echo "new: $(git -C "$root" log -1 --format='%h %s' "$new" | cut -c1-70)"
else
	echo "new: working tree at $(git -C "$root" log -1 --format='%h %s' HEAD | cut -c1-60)"
fi
echo "$rounds rounds, alternating; medians; $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
table "$tmp"
