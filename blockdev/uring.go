package blockdev

// URingOptions configures OpenURing and CreateURing. The zero value opens
// read-write, buffered, with a queue depth of 128.
type URingOptions struct {
	// FileOptions are the File's options (ReadOnly, Direct, BlockSize),
	// with the same meaning.
	FileOptions
	// Entries is the queue depth: how many requests may be in flight at
	// once. Callers beyond it wait for a free slot. Zero means 128; the
	// kernel rounds it up to a power of two; at most 4096.
	Entries int
}

// uringDefaultEntries and uringMaxEntries bound URingOptions.Entries.
const (
	uringDefaultEntries = 128
	uringMaxEntries     = 4096
)

func (o URingOptions) entries() uint32 {
	switch {
	case o.Entries <= 0:
		return uringDefaultEntries
	case o.Entries > uringMaxEntries:
		return uringMaxEntries
	}
	return uint32(o.Entries)
}
