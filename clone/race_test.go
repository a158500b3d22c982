//go:build race

package clone

// raceEnabled scales long random workloads down under the race detector,
// which slows byte loops twentyfold.
const raceEnabled = true
