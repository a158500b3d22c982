//go:build race

package journal

// raceEnabled: the race detector slows the single-goroutine exhaustive
// tests twentyfold; they sample under it, and run whole without it.
const raceEnabled = true
