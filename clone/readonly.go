package clone

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// refuseChange returns the error of a change to a clone opened with
// Options.ReadOnly, or nil.
func (c *Clone) refuseChange(op string) error {
	if c.opts.ReadOnly {
		return fmt.Errorf("clone: %s: opened read-only: %w", op, blockdev.ErrReadOnly)
	}
	return nil
}
