package archive

// A manifest, key "manifests/<backup ID>", describes one backup. Its
// plaintext (before the object envelope of object.go compresses and perhaps
// encrypts it):
//
//	offset  size    meaning
//	0       8       magic "BSARMAN1"
//	8       2       version (1)
//	10      2       flags, zero
//	12      4       repository block size in bytes
//	16      8       volume size in bytes
//	24      4       the volume's device block size (512 or 4096)
//	28      4       reserved, zero
//	32      8       creation time, Unix nanoseconds
//	40      8       snapshot ID in its store (0 if not from a store)
//	48      8       number of blocks N = ceil(size / block size)
//	56      2x4     lengths of the four strings below (each at most 1024)
//	64      ...     strings: backup ID, parent backup ID ("" for a full
//	                backup), volume identity, snapshot name
//	...     32xN    per block: its hash (the block's object name), or 32
//	                zero bytes for a block that reads as zeros
//	...     32      SHA-256 of everything before it
//
// Block i covers bytes [i*block size, min((i+1)*block size, size)).

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"time"
)

const (
	manMagic  = "BSARMAN1"
	manFixed  = 64
	maxString = 1024
)

// Hash names a block: SHA-256 of its contents, or HMAC-SHA256 under the
// repository's MAC key when the repository is encrypted. The zero Hash
// stands for a block of zeros, which is never stored.
type Hash [32]byte

// IsZero reports whether h stands for a block of zeros.
func (h Hash) IsZero() bool { return h == Hash{} }

// String is the hash in hex, as in the block's object name.
func (h Hash) String() string { return fmt.Sprintf("%x", h[:]) }

// Manifest is one backup's description.
type Manifest struct {
	ID        string // the backup ID
	Parent    string // the parent backup for an incremental, else ""
	Volume    string // the volume's identity
	Snapshot  string // the snapshot's name
	SnapID    uint64 // the snapshot's ID in its store
	Created   time.Time
	Size      int64 // volume size in bytes
	BlockSize int   // repository block size
	DevBlock  int   // the volume's device block size
	Blocks    []Hash
}

// blockLen is the length of block i.
func (m *Manifest) blockLen(i int) int {
	off := int64(i) * int64(m.BlockSize)
	return int(min(int64(m.BlockSize), m.Size-off))
}

func manifestKey(id string) string { return "manifests/" + id }

func blockKey(h Hash) string {
	s := h.String()
	return "blocks/" + s[:2] + "/" + s
}

func (m *Manifest) encode() []byte {
	strs := []string{m.ID, m.Parent, m.Volume, m.Snapshot}
	n := manFixed
	for _, s := range strs {
		n += len(s)
	}
	b := make([]byte, manFixed, n+32*len(m.Blocks)+32)
	copy(b, manMagic)
	le := binary.LittleEndian
	le.PutUint16(b[8:], 1)
	le.PutUint32(b[12:], uint32(m.BlockSize))
	le.PutUint64(b[16:], uint64(m.Size))
	le.PutUint32(b[24:], uint32(m.DevBlock))
	le.PutUint64(b[32:], uint64(m.Created.UnixNano()))
	le.PutUint64(b[40:], m.SnapID)
	le.PutUint64(b[48:], uint64(len(m.Blocks)))
	for i, s := range strs {
		le.PutUint16(b[56+2*i:], uint16(len(s)))
	}
	for _, s := range strs {
		b = append(b, s...)
	}
	for i := range m.Blocks {
		b = append(b, m.Blocks[i][:]...)
	}
	sum := sha256.Sum256(b)
	return append(b, sum[:]...)
}

func decodeManifest(b []byte) (*Manifest, error) {
	bad := func(what string, args ...any) error {
		return fmt.Errorf("archive: manifest: %s: %w", fmt.Sprintf(what, args...), ErrCorrupt)
	}
	if len(b) < manFixed+32 || string(b[:8]) != manMagic {
		return nil, bad("bad magic")
	}
	body := b[:len(b)-32]
	if sum := sha256.Sum256(body); string(sum[:]) != string(b[len(body):]) {
		return nil, bad("checksum mismatch")
	}
	le := binary.LittleEndian
	if v := le.Uint16(b[8:]); v != 1 || le.Uint16(b[10:]) != 0 || le.Uint32(b[28:]) != 0 {
		return nil, bad("version %d or reserved fields", v)
	}
	m := &Manifest{
		BlockSize: int(le.Uint32(b[12:])),
		Size:      int64(le.Uint64(b[16:])),
		DevBlock:  int(le.Uint32(b[24:])),
		Created:   time.Unix(0, int64(le.Uint64(b[32:]))).UTC(),
		SnapID:    le.Uint64(b[40:]),
	}
	if m.BlockSize < minBlockSize || m.BlockSize > maxBlockSize || m.BlockSize&(m.BlockSize-1) != 0 {
		return nil, bad("block size %d", m.BlockSize)
	}
	if m.DevBlock != 512 && m.DevBlock != 4096 || m.Size <= 0 || m.Size%int64(m.DevBlock) != 0 {
		return nil, bad("size %d, device block size %d", m.Size, m.DevBlock)
	}
	nblocks := le.Uint64(b[48:])
	if want := (uint64(m.Size) + uint64(m.BlockSize) - 1) / uint64(m.BlockSize); nblocks != want {
		return nil, bad("%d blocks for size %d", nblocks, m.Size)
	}
	p := manFixed
	var strs [4]string
	for i := range strs {
		n := int(le.Uint16(b[56+2*i:]))
		if n > maxString || p+n > len(body) {
			return nil, bad("string %d length %d", i, n)
		}
		strs[i] = string(body[p : p+n])
		p += n
	}
	// The checksum matched, so the length check below bounds the
	// allocation by the input.
	if uint64(len(body)-p) != 32*nblocks {
		return nil, bad("%d bytes of hashes for %d blocks", len(body)-p, nblocks)
	}
	m.ID, m.Parent, m.Volume, m.Snapshot = strs[0], strs[1], strs[2], strs[3]
	if !validID(m.ID) || (m.Parent != "" && !validID(m.Parent)) {
		return nil, bad("backup ID %q or parent %q", m.ID, m.Parent)
	}
	m.Blocks = make([]Hash, nblocks)
	for i := range m.Blocks {
		copy(m.Blocks[i][:], body[p:])
		p += 32
	}
	return m, nil
}

// validID: backup IDs become object keys, so they are restricted to
// [A-Za-z0-9._-], 1 to 128 characters, not starting with a dot.
func validID(id string) bool {
	if id == "" || len(id) > 128 || id[0] == '.' {
		return false
	}
	for _, c := range []byte(id) {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}
