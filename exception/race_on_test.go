//go:build race

package exception

const raceEnabled = true
