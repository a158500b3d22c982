// Package metamorphic holds a test, and nothing else: one random stream of
// operations (writes, flushes, discards, write-zeroes, reads) runs against
// every Device in the repository (plain devices, every engine's volumes, and
// the NBD client over each), under configurations drawn from the seed, and
// the histories of what the reads returned must be identical. A failure
// prints the seed, the configuration and the shortest failing prefix of the
// stream found by shrinking it.
//
// Run it with `go test ./internal/metamorphic`; BLOCKSNAP_SEED replays a
// run, BLOCKSNAP_METAMORPHIC_RUNS sets the number of configurations.
package metamorphic
