// Package blocksnap is an embeddable Go library for block-level snapshots,
// clones and copy-on-write, in user space: what Linux device-mapper gives
// the kernel (dm-snapshot, dm-thin snapshots, dm-clone), for a Go program,
// without kernel modules and without their limits.
//
// This package holds no code; it is the map of how the packages compose.
// The repository's docs/ directory has the rest: docs/design.md (the
// architecture and the crash model), docs/formats.md (every on-disk
// format), docs/control.md (the control socket of a running blocksnap serve
// or hydrate, spoken by package control) and docs/cli/ (a page per command
// of cmd/blocksnap).
//
// # The Device contract
//
// Everything is a [github.com/blocksnap/blocksnap/blockdev.Device]: a
// fixed-size array of blocks with ReadAt, WriteAt, Flush, Discard, Size,
// BlockSize and Close, safe for concurrent use, with a precise contract for
// alignment, bounds, durability (Flush is a barrier) and discards (they read
// back as zeros). Package blockdev provides Mem (RAM, sparse), File (a file
// or block device node, optionally O_DIRECT), URing (io_uring), Slice (a
// region of another device) and ReadOnly. Package blockdev/blockdevtest is
// the kit every device and engine is tested with: the conformance suite Run,
// CrashSim (a disk with a volatile write cache that can lose power), Faulty
// (error injection) and Delayed (a slow device).
//
// # Engines
//
// Every volume an engine hands out is itself a Device, so engines stack (a
// clone whose destination is a snapshot volume, a snapshot of a clone) and
// any volume can be exported over NBD.
//
//   - journal: the crash-safe metadata log the engines keep their state in:
//     records with CRC32C, group commit, two checkpoint slots, replay.
//   - exception: the dm-snapshot model. An Origin wraps any Device; each
//     snapshot has its own copy-on-write store, transient or persistent in
//     the Linux kernel's on-disk format. The baseline the others are
//     measured against: an origin write costs one copy per snapshot.
//   - snapshot: the shared store. Many snapshots and writable clones (to any
//     depth) of one origin share one store and one index, so an origin write
//     copies a chunk at most once however many snapshots exist; deletes are
//     metadata-only; diffs between snapshots cost what the answer costs.
//   - clone: the dm-clone model. A destination is hydrated in the background
//     from a read-only (slow, remote) source and is usable at once.
//   - nbd: an NBD server that exports any Device to QEMU, qemu-img, nbdcopy,
//     fio and the kernel, and a client that makes a remote export a Device.
//
// Dependencies point one way (the package imports as they are; go list
// shows them):
//
//   - blockdev imports none of ours; blockdev/blockdevtest imports blockdev
//     only and is imported by tests, bench and snapshot/metascale.
//   - journal, exception, snapshot/diffstream, snapshot/internal/meta (the
//     next metadata layer, not yet used by snapshot) and nbd import blockdev
//     only: exception keeps the kernel's own format, not a journal, and nbd
//     serves any Device without knowing which engine made it.
//   - clone imports blockdev and journal; snapshot imports blockdev,
//     journal and snapshot/diffstream; snapshot/metascale imports
//     snapshot/internal/meta.
//   - archive imports blockdev and snapshot (backups are snapshot diffs).
//   - control (the control socket protocol of a running blocksnap serve or
//     hydrate) imports none of ours: a VM manager can drive a server with
//     it alone.
//   - cmd/blocksnap, bench and examples sit on top: they import the
//     engines, archive, nbd, control and blockdev; nothing imports them.
//     internal/metamorphic holds only a test, which imports them all.
//
// The engines never import each other.
//
// # Crash model
//
// The library promises what a disk with a volatile write cache promises,
// plus snapshot immutability: writes completed before the last successful
// Flush survive a crash; unflushed writes may survive whole, in part (per
// sector) or not at all, and a read never returns bytes never written to that
// address of that volume; a snapshot's contents never change after it is
// taken (unless it is a writable clone changed by its own writes); after any
// crash, Open recovers in time bounded by the journal's length and Check
// passes.
package blocksnap
