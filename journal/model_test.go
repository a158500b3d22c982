package journal

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"runtime"
	"sync"
)

// model is what a test knows about a journal from outside it: every record
// appended (by sequence, in the current life of the log), what has been
// committed, and which checkpoints may be current. Its checkpoints are
// self-checking: upTo, a hash of every record up to upTo, and filler bytes
// derived from upTo, so a torn or mixed checkpoint cannot pass.
type model struct {
	mu        sync.Mutex
	payload   map[uint64][]byte // seq -> payload appended with that seq
	committed uint64            // every seq <= committed was durable when a Commit returned
	ckDone    uint64            // upTo of the last checkpoint that returned nil (0: none)
	ckTried   map[uint64]bool   // upTo of checkpoints tried since ckDone (any may have become current)
	ckOK      bool              // a checkpoint has ever become current
}

func newModel() *model { return &model{payload: map[uint64][]byte{}, ckTried: map[uint64]bool{}} }

func (m *model) appended(seq uint64, p []byte) {
	m.mu.Lock()
	m.payload[seq] = p
	m.mu.Unlock()
}

func (m *model) commitReturned(upTo uint64) {
	m.mu.Lock()
	m.committed = max(m.committed, upTo)
	m.mu.Unlock()
}

// hash is the state a checkpoint at upTo must reflect.
func (m *model) hashLocked(upTo uint64) (uint64, bool) {
	h := fnv.New64a()
	var b [8]byte
	for s := uint64(1); s <= upTo; s++ {
		p, ok := m.payload[s]
		if !ok {
			return 0, false
		}
		binary.LittleEndian.PutUint64(b[:], uint64(len(p)))
		h.Write(b[:])
		h.Write(p)
	}
	return h.Sum64(), true
}

// captureFor waits until every record up to upTo has been recorded (its
// Append returned; the appender records it right after) and returns the
// checkpoint writer for that state. It marks the checkpoint as tried.
func (m *model) captureFor(upTo uint64) func(io.Writer) error {
	for {
		m.mu.Lock()
		h, ok := m.hashLocked(upTo)
		if ok {
			m.ckTried[upTo] = true
			m.mu.Unlock()
			return ckptImage(upTo, h)
		}
		m.mu.Unlock()
		runtime.Gosched()
	}
}

func (m *model) checkpointReturned(upTo uint64) {
	m.mu.Lock()
	m.ckDone, m.ckOK = upTo, true
	clear(m.ckTried)
	m.mu.Unlock()
}

// ckptImage streams a checkpoint: upTo, hash, filler length, filler, in
// uneven writes.
func ckptImage(upTo, h uint64) func(io.Writer) error {
	return func(w io.Writer) error {
		n := int(upTo*131%3000) + 1
		b := make([]byte, 20+n)
		binary.LittleEndian.PutUint64(b[0:], upTo)
		binary.LittleEndian.PutUint64(b[8:], h)
		binary.LittleEndian.PutUint32(b[16:], uint32(n))
		fillSeeded(b[20:], upTo)
		for len(b) > 0 {
			k := min(len(b), 1+int(upTo%700))
			if _, err := w.Write(b[:k]); err != nil {
				return err
			}
			b = b[k:]
		}
		return nil
	}
}

func fillSeeded(b []byte, seed uint64) {
	r := rand.New(rand.NewPCG(seed, 7))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

// checker is the Replayer a recovery is checked with.
type checker struct {
	loaded bool
	upTo   uint64
	hash   uint64
	seqs   []uint64
	recs   [][]byte
}

func (c *checker) LoadCheckpoint(r io.Reader) error {
	if c.loaded {
		return fmt.Errorf("LoadCheckpoint called twice")
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if len(b) < 20 {
		return fmt.Errorf("checkpoint of %d bytes", len(b))
	}
	c.loaded = true
	c.upTo = binary.LittleEndian.Uint64(b[0:])
	c.hash = binary.LittleEndian.Uint64(b[8:])
	n := int(binary.LittleEndian.Uint32(b[16:]))
	want := make([]byte, n)
	fillSeeded(want, c.upTo)
	if n != len(b)-20 || string(want) != string(b[20:]) {
		return fmt.Errorf("checkpoint upTo %d: filler does not match", c.upTo)
	}
	return nil
}

func (c *checker) Replay(seq uint64, payload []byte) error {
	c.seqs = append(c.seqs, seq)
	c.recs = append(c.recs, append([]byte{}, payload...))
	return nil
}

// verify checks a recovery against the model and, if it holds, makes the
// recovered state the model's (records past it are forgotten: they were
// lost, which is allowed for records never committed).
func (m *model) verify(c *checker) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	base := uint64(0)
	switch {
	case c.loaded:
		if !(m.ckOK && c.upTo == m.ckDone) && !m.ckTried[c.upTo] {
			return fmt.Errorf("checkpoint upTo %d is neither the last completed (%d) nor one tried since (%v)", c.upTo, m.ckDone, m.ckTried)
		}
		h, ok := m.hashLocked(c.upTo)
		if !ok || h != c.hash {
			return fmt.Errorf("checkpoint upTo %d does not hold the state of its records", c.upTo)
		}
		base = c.upTo
	case m.ckOK:
		return fmt.Errorf("checkpoint upTo %d was completed but none was loaded", m.ckDone)
	}
	for i, seq := range c.seqs {
		if seq != base+uint64(i)+1 {
			return fmt.Errorf("replayed seq %d at position %d after checkpoint %d", seq, i, base)
		}
		p, ok := m.payload[seq]
		if !ok || string(p) != string(c.recs[i]) {
			return fmt.Errorf("replayed seq %d was never appended with this payload", seq)
		}
	}
	last := base + uint64(len(c.seqs))
	if last < m.committed {
		return fmt.Errorf("recovered up to seq %d, but Commit returned for %d", last, m.committed)
	}
	for s := range m.payload {
		if s > last {
			delete(m.payload, s)
		}
	}
	m.committed = last
	if c.loaded {
		m.ckDone, m.ckOK = c.upTo, true
		clear(m.ckTried)
	}
	return nil
}

// testPayload is a record unique to (tag, i), of a size that sometimes
// spans blocks.
func testPayload(rng *rand.Rand, tag string) []byte {
	n := rng.IntN(400)
	if rng.IntN(8) == 0 {
		n = 500 + rng.IntN(5000)
	}
	p := make([]byte, len(tag)+n)
	copy(p, tag)
	for i := len(tag); i < len(p); i++ {
		p[i] = byte(rng.Uint32())
	}
	return p
}
