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
