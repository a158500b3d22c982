//go:build race

package snapshot

// raceEnabled: the race detector makes the long fill-the-region tests
// (hundreds of thousands of records) 10-20 times slower. skipUnderRace
// skips them in the short race run (make race); the unit run executes
// them in full, and the concurrent paths they touch have their own race
// tests.
const raceEnabled = true
