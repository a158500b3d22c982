package journal_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"strings"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/journal"
)

// counters is a tiny engine: named counters, changed by records "name+n",
// checkpointed as text.
type counters struct {
	m map[string]int
}

func (c *counters) apply(rec string) {
	var name string
	var n int
	if _, err := fmt.Sscanf(strings.Replace(rec, "+", " ", 1), "%s %d", &name, &n); err == nil {
		c.m[name] += n
	}
}

// LoadCheckpoint implements journal.Replayer.
func (c *counters) LoadCheckpoint(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	for _, line := range strings.Fields(string(b)) {
		c.apply(line)
	}
	fmt.Printf("checkpoint loaded: %d bytes\n", len(b))
	return nil
}

// Replay implements journal.Replayer.
func (c *counters) Replay(seq uint64, payload []byte) error {
	fmt.Printf("replay %d: %s\n", seq, payload)
	c.apply(string(payload))
	return nil
}

// Example shows the life of a journal: format a region, append and commit
// records, checkpoint the state, append more, and recover it all on Open.
func Example() {
	ctx := context.Background()
	disk, err := blockdev.NewMem(16<<20, 4096)
	if err != nil {
		log.Fatal(err)
	}
	// The journal lives in the first 4 MiB of the disk.
	region, err := blockdev.Slice(disk, 0, 4<<20)
	if err != nil {
		log.Fatal(err)
	}
	j, err := journal.Format(region, journal.Options{CheckpointSize: 1 << 20})
	if err != nil {
		log.Fatal(err)
	}
	state := &counters{m: map[string]int{}}
	update := func(rec string) {
		if _, err := j.Append(ctx, []byte(rec)); err != nil {
			log.Fatal(err)
		}
		state.apply(rec)
	}
	update("apples+3")
	update("pears+1")
	// Durable once Commit returns; concurrent Commits share one flush.
	if err := j.Commit(ctx); err != nil {
		log.Fatal(err)
	}
	// Checkpoint the state that reflects every record up to LastSeq; the
	// log space they used is then reused.
	err = j.Checkpoint(ctx, j.LastSeq(), func(w io.Writer) error {
		for name, n := range state.m {
			if _, err := fmt.Fprintf(w, "%s+%d\n", name, n); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		log.Fatal(err)
	}
	update("apples+2")
	if err := j.Commit(ctx); err != nil {
		log.Fatal(err)
	}
	update("plums+9") // never committed: may be lost
	if err := j.Close(); err != nil {
		log.Fatal(err)
	}

	// Recovery: the checkpoint, then the records after it.
	recovered := &counters{m: map[string]int{}}
	j, err = journal.Open(region, journal.Options{}, recovered)
	if err != nil {
		log.Fatal(err)
	}
	defer j.Close()
	fmt.Println("apples:", recovered.m["apples"], "pears:", recovered.m["pears"], "last seq:", j.LastSeq())
	// Output:
	// checkpoint loaded: 17 bytes
	// replay 3: apples+2
	// apples: 5 pears: 1 last seq: 3
}
