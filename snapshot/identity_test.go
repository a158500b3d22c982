package snapshot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// slices returns views of two devices that cannot be locked (a Slice is
// not a blockdev.Locker): only the owner record guards a store on them.
func sliceViews(t *testing.T, origin, store blockdev.Device) (blockdev.Device, blockdev.Device) {
	t.Helper()
	o, err := blockdev.Slice(origin, 0, origin.Size())
	require.NoError(t, err)
	s, err := blockdev.Slice(store, 0, store.Size())
	require.NoError(t, err)
	return o, s
}

// fillDev writes n bytes of b at off of d.
func fillDev(t *testing.T, d blockdev.Device, b byte, off, n int64) {
	t.Helper()
	_, err := d.WriteAt(bytes.Repeat([]byte{b}, int(n)), off)
	require.NoError(t, err)
}

// sliceStore formats a store on views of two new Mems (an origin of 1
// MiB, a store of 4 MiB) that cannot be locked, and returns the Mems and
// the open store.
func sliceStore(t *testing.T) (origin, store *blockdev.Mem, s *Store) {
	t.Helper()
	origin, store = blockdevtest.NewMem(t, 1<<20, 512), blockdevtest.NewMem(t, 4<<20, 4096)
	o, sv := sliceViews(t, origin, store)
	s, err := Format(o, sv, Options{ChunkSize: 16 << 10})
	require.NoError(t, err)
	return origin, store, s
}

// readGeometry decodes the store's superblock.
func readGeometry(t *testing.T, store blockdev.Device) geometry {
	t.Helper()
	b := make([]byte, superblockSize)
	_, err := store.ReadAt(b, 0)
	require.NoError(t, err)
	g, err := decodeSuperblock(b)
	require.NoError(t, err)
	return g
}

// rewriteIdentity changes the store's identity state with f and writes
// both slots, as a Store would.
func rewriteIdentity(t *testing.T, store blockdev.Device, f func(st *identState)) {
	t.Helper()
	g := readGeometry(t, store)
	st, err := readIdentity(store, &g)
	require.NoError(t, err)
	f(&st)
	st.seq++
	for slot := range 2 {
		_, err := store.WriteAt(st.encode(slot), g.idOff+int64(slot)*identitySlot)
		require.NoError(t, err)
	}
	require.NoError(t, store.Flush())
}

func ownerOf(t *testing.T, store blockdev.Device) ownerRecord {
	t.Helper()
	g := readGeometry(t, store)
	st, err := readIdentity(store, &g)
	require.NoError(t, err)
	return st.owner
}

// A second Open of a store open in this process, through devices that
// cannot be locked, is refused by the owner record, naming this process;
// a read-only Open goes ahead and reports the holder; Close clears the
// record, and the next Open succeeds.
func TestSecondOpenRefusedWithoutFlock(t *testing.T) {
	origin, store, st := sliceStore(t)
	_, err := st.CreateSnapshot("kept", st.Origin())
	require.NoError(t, err)
	own, ok := st.Owner()
	require.True(t, ok)
	require.Equal(t, os.Getpid(), own.PID)
	require.False(t, own.Flock, "a Slice takes no flock")

	o2, s2 := sliceViews(t, origin, store)
	_, err = Open(o2, s2, Options{})
	require.ErrorIs(t, err, ErrLocked)
	var oe *OwnerError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, os.Getpid(), oe.PID)
	require.Equal(t, own.OpenID, oe.OpenID)
	require.Contains(t, err.Error(), fmt.Sprintf("held by pid %d on host", os.Getpid()))

	ro, err := Open(o2, s2, Options{ReadOnly: true})
	require.NoError(t, err)
	seen, ok := ro.Owner()
	require.True(t, ok, "a read-only Open reports the live holder")
	require.Equal(t, own, seen)
	_, err = ro.OpenVolume("kept")
	require.NoError(t, err)
	require.NoError(t, ro.Close())

	require.NoError(t, st.Close())
	require.False(t, ownerOf(t, store).held(), "Close clears the record")
	reopenKept(t, o2, s2)
}

// reopenKept opens the store, finds the volume "kept" in it, checks it
// and closes it.
func reopenKept(t *testing.T, origin, store blockdev.Device) {
	t.Helper()
	s, err := Open(origin, store, Options{})
	require.NoError(t, err)
	_, err = s.OpenVolume("kept")
	require.NoError(t, err)
	mustCheck(t, s)
	require.NoError(t, s.Close())
}

// Format over a store that another Store holds is refused the same way
// (it would pull the journal from under it), unless TakeOver; over one
// nobody holds it goes ahead.
func TestFormatOverHeldStoreRefused(t *testing.T) {
	origin, store, st := sliceStore(t)
	o1, s1 := sliceViews(t, origin, store)
	o2, s2 := sliceViews(t, origin, store)
	_, err := Format(o2, s2, Options{ChunkSize: 16 << 10})
	var oe *OwnerError
	require.ErrorAs(t, err, &oe)
	require.NoError(t, st.Close())
	st, err = Format(o2, s2, Options{ChunkSize: 16 << 10})
	require.NoError(t, err, "nobody holds it now")
	st2, err := Format(o1, s1, Options{ChunkSize: 16 << 10, TakeOver: true})
	require.NoError(t, err, "TakeOver formats over a holder")
	require.NoError(t, st2.Close())
	_ = st.Close()
}

// A crash leaves the owner record of a Store that is gone: the next Open
// of this process takes it over (so does one after a crash of another
// process of this host, whose pid is gone, and one that gets the flock
// the holder had); a holder on another host is refused unless TakeOver.
func TestStaleOwnerTakenOver(t *testing.T) {
	origin := blockdevtest.MustCrashSim(1<<20, 512)
	store := blockdevtest.MustCrashSim(4<<20, 512)
	s, err := Format(origin, store, Options{ChunkSize: 16 << 10, CommitInterval: -1})
	require.NoError(t, err)
	_, err = s.CreateSnapshot("kept", s.Origin())
	require.NoError(t, err)
	fillAt(t, s.Origin(), 3, 0, 64<<10) // touches sample 0, not flushed
	store2 := store.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Drop})
	origin2 := origin.MustCrash(blockdevtest.Policy{Mode: blockdevtest.Keep})
	_ = s.Close()
	require.True(t, ownerOf(t, store2).held())

	reopenKept(t, origin2, store2) // the crashed Store's record is taken over

	gone := exitedPid(t)
	type ownerCase struct {
		name  string
		owner ownerRecord
		ok    bool // taken over without TakeOver
	}
	cases := []ownerCase{
		{"this host, pid gone", ownerRecord{pid: uint64(gone), host: thisHost()}, true},
		{"this host, pid alive", ownerRecord{pid: 1, host: thisHost(), since: time.Now().UnixNano()}, false},
		{"another host", ownerRecord{pid: uint64(gone), host: "elsewhere"}, false},
		{"another host, had the flock (this device has none)", ownerRecord{pid: 7, host: "elsewhere", flock: true}, false},
	}
	if _, ok := bootTime(); ok {
		cases = append(cases, ownerCase{"this host, pid alive, opened before the last boot", ownerRecord{pid: 1, host: thisHost(), since: 1}, true})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.owner
			o.id = [16]byte{1, 2, 3}
			if o.since == 0 {
				o.since = time.Now().UnixNano()
			}
			rewriteIdentity(t, store2, func(st *identState) { st.owner = o })
			s, err := Open(origin2, store2, Options{})
			if tc.ok {
				require.NoError(t, err)
				require.NoError(t, s.Close())
				return
			}
			var oe *OwnerError
			require.ErrorAs(t, err, &oe)
			require.ErrorIs(t, err, ErrLocked)
			require.Equal(t, o.host, oe.Host)
			require.Equal(t, int(o.pid), oe.PID)
			require.Contains(t, err.Error(), "Options.TakeOver")
			s, err = Open(origin2, store2, Options{ReadOnly: true})
			require.NoError(t, err, "read-only opens beside it")
			require.NoError(t, s.Close())
			require.Equal(t, o, ownerOf(t, store2), "a read-only Open writes nothing")
			s, err = Open(origin2, store2, Options{TakeOver: true})
			require.NoError(t, err)
			mustCheck(t, s)
			require.NoError(t, s.Close())
		})
	}
}

// A holder on another host that had the store file's flock is gone once
// this Open gets the flock.
func TestOwnerWithFreeFlockTakenOver(t *testing.T) {
	originPath, storePath := fileStore(t)
	store := openFile(t, storePath, false)
	rewriteIdentity(t, store, func(st *identState) {
		st.owner = ownerRecord{id: [16]byte{9}, pid: 7, host: "elsewhere", since: 1, flock: true}
	})
	s, err := Open(openFile(t, originPath, false), store, Options{})
	require.NoError(t, err)
	own, _ := s.Owner()
	require.True(t, own.Flock)
	require.NoError(t, s.Close())
}

// exitedPid is the pid of a process that has exited (and been reaped).
func exitedPid(t *testing.T) int {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe, "-test.run=^$")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}

// TestOwnerRefusedAcrossProcesses holds the store open in a child process
// through devices without flock (TestStoreHolderProcess) and sees Open
// refused with the child's pid by the owner record, then succeed once the
// child has closed the store and exited.
func TestOwnerRefusedAcrossProcesses(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("needs a unix child process")
	}
	originPath, storePath := fileStore(t)
	pid, finish := blockdevtest.StartChild(t, "TestStoreHolderProcess",
		"BLOCKSNAP_HOLDER_ORIGIN="+originPath, "BLOCKSNAP_HOLDER_STORE="+storePath, "BLOCKSNAP_HOLDER_SLICES=1")
	o, s := sliceViews(t, openFile(t, originPath, false), openFile(t, storePath, false))
	_, err := Open(o, s, Options{})
	var oe *OwnerError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, pid, oe.PID)
	finish()
	st, err := Open(o, s, Options{})
	require.NoError(t, err)
	_, err = st.OpenVolume("child")
	require.NoError(t, err, "the child's snapshot is there")
	require.NoError(t, st.Close())
}

// Open with another origin than the store's is refused with the identity
// message: a device of another size, and one of the same size with other
// contents. The store's own origin, written and flushed through the
// store, opens.
func TestWrongOriginRefused(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10})
	fp := func() uint64 {
		s.id.mu.Lock()
		defer s.id.mu.Unlock()
		return s.id.st.fingerprint()
	}()
	require.NotZero(t, fp)
	// Writes over every sample, flushed: the fingerprint follows them.
	for off := int64(0); off < 1<<20; off += 64 << 10 {
		fillAt(t, s.Origin(), 5, off, 64<<10)
	}
	require.NoError(t, s.Origin().Flush())
	require.Zero(t, s.id.durable.Load(), "every sample settled after the Flush")
	require.NoError(t, s.Close())

	bigger, err := blockdev.NewMem(2<<20, 512)
	require.NoError(t, err)
	_, err = Open(bigger, store, Options{})
	require.ErrorIs(t, err, ErrWrongOrigin)
	require.NotErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, "this store belongs to a different origin (size 1048576, fingerprint ")
	require.ErrorContains(t, err, "the origin device has 2097152 bytes")

	other := memCopy(t, origin)
	pos, _ := samplePositions(1 << 20)
	fillDev(t, other, 6, pos[7], 4096) // a sampled block, changed outside the store
	_, err = Open(other, store, Options{ReadOnly: true})
	var oe *OriginError
	require.ErrorAs(t, err, &oe)
	require.Equal(t, int64(1<<20), oe.Size)
	require.NotEqual(t, oe.Fingerprint, oe.GotFingerprint)
	require.Len(t, oe.Samples, 1)
	require.ErrorContains(t, err, fmt.Sprintf("this store belongs to a different origin (size 1048576, fingerprint %016x)", oe.Fingerprint))

	blank, err := blockdev.NewMem(1<<20, 512)
	require.NoError(t, err)
	_, err = Open(blank, store, Options{})
	require.ErrorIs(t, err, ErrWrongOrigin)

	s, err = Open(origin, store, Options{})
	require.NoError(t, err, "the store's own origin")
	mustCheck(t, s)
	require.NoError(t, s.Close())
}

// A crash after unflushed writes over every sample, with any policy,
// never makes Open refuse the store's own origin: the samples were marked
// dirty before the writes reached the origin. The Open hashes them again,
// so that a later change of the origin outside the store is refused.
func TestNoFalseOriginRefusalAfterCrash(t *testing.T) {
	seed := blockdevtest.Seed(t)
	for _, p := range blockdevtest.AllPolicies(seed) {
		origin := blockdevtest.MustCrashSim(512<<10, 512)
		store := blockdevtest.MustCrashSim(4<<20, 512)
		fillPattern(t, origin, 2)
		s, err := Format(origin, store, Options{ChunkSize: 4 << 10, CommitInterval: -1, OriginBuffer: -1})
		require.NoError(t, err)
		for off := int64(0); off < 512<<10; off += 32 << 10 {
			fillAt(t, s.Origin(), 7, off, 32<<10)
		}
		require.NotZero(t, s.id.durable.Load())
		st2, o2 := store.MustCrash(p), origin.MustCrash(p)
		_ = s.Close()
		s, err = Open(o2, st2, Options{})
		require.NoError(t, err, "%v", p)
		require.Zero(t, s.id.durable.Load(), "%v: Open settles the dirty samples", p)
		require.NoError(t, s.Close())
		fillDev(t, o2, 8, 0, 4096)
		_, err = Open(o2, st2, Options{})
		require.ErrorIs(t, err, ErrWrongOrigin, "%v", p)
	}
}

// Flipping any bit of one identity slot is harmless: the slot is rejected
// and its twin holds the same state. Both slots bad is ErrCorrupt, never
// a panic.
func TestIdentitySlotBitFlips(t *testing.T) {
	s, origin, store := newMemStore(t, 1<<20, 4<<20, Options{ChunkSize: 16 << 10})
	require.NoError(t, s.Close())
	g := readGeometry(t, store)
	good := make([]byte, identityLen)
	_, err := store.ReadAt(good, g.idOff)
	require.NoError(t, err)
	want, err := readIdentity(store, &g)
	require.NoError(t, err)
	for i := 0; i < 512*8; i++ { // the encoded part of slot 0; the tail is zero-checked the same way
		b := bytes.Clone(good)
		b[i/8] ^= 1 << (i % 8)
		_, err := decodeIdentity(b, 0, &g)
		require.ErrorIs(t, err, ErrCorrupt, "bit %d", i)
		got, err := readIdentity(bytes.NewReader(b), &geometry{idOff: 0, uuid: g.uuid, originSize: g.originSize})
		require.NoError(t, err, "bit %d", i)
		require.Equal(t, want.fingerprint(), got.fingerprint())
	}
	b := bytes.Clone(good)
	b[100] ^= 1
	b[identitySlot+100] ^= 1
	_, err = store.WriteAt(b, g.idOff)
	require.NoError(t, err)
	_, err = Open(origin, store, Options{})
	require.ErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, fmt.Sprintf("identity slot 0 at store offset %d", g.idOff))
	require.ErrorContains(t, err, "Options.TakeOver writes a new owner record")
	s, err = Open(origin, store, Options{ReadOnly: true, TakeOver: true})
	require.NoError(t, err, "a read-only open reads past it")
	mustCheck(t, s)
	require.NoError(t, s.Close())
	_, err = Open(origin, store, Options{ReadOnly: true})
	require.ErrorIs(t, err, ErrCorrupt, "and writes nothing")
	s, err = Open(origin, store, Options{TakeOver: true})
	require.NoError(t, err, "TakeOver writes a new region")
	require.Zero(t, s.id.durable.Load(), "the origin fingerprinted as it is")
	require.NoError(t, s.Close())
	s, err = Open(origin, store, Options{})
	require.NoError(t, err)
	mustCheck(t, s)
	require.NoError(t, s.Close())
}

// FuzzIdentity: a slot image decodes or fails with ErrCorrupt, never
// panics; one that decodes re-encodes to itself. Inputs are the slot's
// encoded prefix (the rest zero), checksummed when sum is set.
func FuzzIdentity(f *testing.F) {
	g := geometry{originSize: 1 << 20, uuid: [16]byte{1}, idOff: superblockSize}
	st := identState{seq: 3, uuid: g.uuid, originSize: g.originSize, n: sampleCount(g.originSize), sampleLen: sampleBytes, dirty: 5}
	st.hash[0], st.hash[15] = 1, 2
	st.owner = ownerRecord{id: [16]byte{7}, pid: 42, since: 5, flock: true, host: "host"}
	f.Add(bytes.TrimRight(st.encode(0), "\x00"), true)
	f.Add(bytes.TrimRight((&identState{uuid: g.uuid, originSize: g.originSize}).encode(0), "\x00"), true)
	f.Add([]byte(identityMagic), false)
	f.Fuzz(func(t *testing.T, prefix []byte, sum bool) {
		b := make([]byte, identitySlot)
		copy(b, prefix)
		if sum {
			binary.LittleEndian.PutUint32(b[8:], 0)
			binary.LittleEndian.PutUint32(b[8:], checksum(saltIdentity, b))
		}
		st, err := decodeIdentity(b, 0, &g)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.Equal(t, b, st.encode(0))
	})
}

// The samples: spread over the origin, 4096-aligned, inside it, first and
// last block included; a small origin has fewer.
func TestSamplePositions(t *testing.T) {
	for _, size := range []int64{512, 4096, 12 << 10, 64 << 10, 300<<10 + 1536, 1 << 20, 1 << 40} {
		pos, n := samplePositions(size)
		l := sampleLen(size)
		require.Equal(t, sampleCount(size), n)
		require.Zero(t, pos[0])
		for i := 0; i < n; i++ {
			require.Zero(t, pos[i]%sampleBytes, "size %d sample %d", size, i)
			require.LessOrEqual(t, pos[i]+l, size, "size %d sample %d", size, i)
			if i > 0 {
				require.Greater(t, pos[i], pos[i-1], "size %d sample %d", size, i)
			}
		}
		require.Greater(t, pos[n-1]+l, size-2*sampleBytes, "size %d: the last block is sampled", size)
	}
}

// Check reports an origin block written outside the store, where a
// sample catches it; the store's own writes, flushed or not, never.
func TestCheckSeesOriginWrittenOutside(t *testing.T) {
	s, origin, _ := newMemStore(t, 1<<20, 8<<20, Options{ChunkSize: 4 << 10})
	pos, _ := samplePositions(1 << 20)
	_, err := s.CreateSnapshot("s", s.Origin())
	require.NoError(t, err)
	fillAt(t, s.Origin(), 1, pos[3], 4096) // the store's own write, unflushed
	mustCheck(t, s)
	require.NoError(t, s.Origin().Flush())
	mustCheck(t, s)
	fillDev(t, origin, 2, pos[5], 4096) // behind the store's back
	err = s.Check()
	require.ErrorIs(t, err, ErrCorrupt)
	require.ErrorContains(t, err, fmt.Sprintf("origin block at %d changed outside the store", pos[5]))
}

// A store without an origin has no fingerprint, and its owner record
// works as any other's.
func TestNoOriginNoFingerprint(t *testing.T) {
	store, err := blockdev.NewMem(8<<20, 4096)
	require.NoError(t, err)
	_, sv := sliceViews(t, store, store)
	s, err := Format(nil, sv, Options{ChunkSize: 16 << 10})
	require.NoError(t, err)
	require.Zero(t, s.id.n)
	g := readGeometry(t, store)
	st, err := readIdentity(store, &g)
	require.NoError(t, err)
	require.Zero(t, st.n)
	require.Zero(t, st.fingerprint())
	require.True(t, st.owner.held())
	_, sv2 := sliceViews(t, store, store)
	_, err = Open(nil, sv2, Options{})
	require.ErrorIs(t, err, ErrLocked)
	require.NoError(t, s.Close())
	s, err = Open(nil, sv2, Options{})
	require.NoError(t, err)
	mustCheck(t, s)
	require.NoError(t, s.Close())
}

// touched finds exactly the samples a byte range overlaps.
func TestSamplesTouched(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	for _, size := range []int64{512, 4096, 20 << 10, 300<<10 + 1536, 64 << 20} {
		var id ident
		id.pos, id.n = samplePositions(size)
		id.l = sampleLen(size)
		for range 2000 {
			off := int64(rng.IntN(int(size/512))) * 512
			n := min(int64(1+rng.IntN(64))*512, size-off)
			lo, hi := id.touched(off, n)
			for i := 0; i < id.n; i++ {
				want := id.pos[i] < off+n && off < id.pos[i]+id.l
				require.Equal(t, want, i >= lo && i < hi, "size %d [%d, %d) sample %d at %d", size, off, off+n, i, id.pos[i])
			}
		}
	}
}

// A store on a file keeps its fingerprint across a Close and an Open on
// fresh handles; errors.Is finds the identity error through the CLI's
// wrapping too.
func TestWrongOriginFile(t *testing.T) {
	originPath, storePath := fileStore(t)
	other := filepath.Join(t.TempDir(), "other")
	o := createFile(t, other, 1<<20)
	fillDev(t, o, 9, 0, 1<<20)
	_, err := Open(o, openFile(t, storePath, false), Options{})
	err = fmt.Errorf("blocksnap: open %s: %w", storePath, err)
	require.True(t, errors.Is(err, ErrWrongOrigin), "%v", err)
	s, err := openFiles(t, originPath, storePath, Options{})
	require.NoError(t, err)
	require.NoError(t, s.Close())
}

// Writers over the sampled blocks and others race origin Flushes (which
// settle samples) and a snapshot (whose copies go through the origin
// buffer); a power cut at the end, with any policy, never makes Open
// refuse the origin, and neither does a clean Close. Run with -race.
func TestSamplesUnderConcurrentWrites(t *testing.T) {
	seed := blockdevtest.Seed(t)
	for k, p := range blockdevtest.AllPolicies(seed) {
		const size, bs = 256 << 10, 4096
		origin := blockdevtest.MustCrashSim(size, 512)
		store := blockdevtest.MustCrashSim(8<<20, 512)
		fillPattern(t, origin, seed)
		s, err := Format(origin, store, Options{ChunkSize: 4 << 10, CommitInterval: -1, OriginBuffer: 8 << 10})
		require.NoError(t, err)
		o := s.Origin()
		pos, n := samplePositions(size)
		done := make(chan error, 5)
		for w := range 4 {
			go func() {
				rng := rand.New(rand.NewPCG(seed, uint64(k*8+w)))
				buf := make([]byte, bs)
				var err error
				for i := 0; i < shortScale(200) && err == nil; i++ {
					off := pos[rng.IntN(n)] // a sample, or a block beside one
					if rng.IntN(2) == 0 {
						off = int64(rng.IntN(size/bs)) * bs
					}
					buf[0] = byte(i)
					_, err = o.WriteAt(buf, off)
					if err == nil && i%17 == w {
						err = o.Flush()
					}
				}
				done <- err
			}()
		}
		go func() {
			_, err := s.CreateSnapshot("mid", o)
			done <- err
		}()
		for range 5 {
			require.NoError(t, <-done)
		}
		out, err := blockdevtest.CrashAll(p, origin, store)
		require.NoError(t, err)
		_ = s.Close()
		s, err = Open(out[0], out[1], Options{})
		require.NoError(t, err, "%v", p)
		mustCheck(t, s)
		fillAt(t, s.Origin(), 1, pos[n-1], bs)
		require.NoError(t, s.Close())
		s, err = Open(out[0], out[1], Options{})
		require.NoError(t, err, "%v: after a clean Close", p)
		require.NoError(t, s.Close())
	}
}

// settleSamples leaves a sample dirty when a write touched it after the
// write counts were taken (the Flush may not cover it), or when the origin
// buffer holds its chunk (the device does not have its data yet).
func TestSettleSkipsSamplesWrittenSince(t *testing.T) {
	s, _, _ := newMemStore(t, 1<<20, 8<<20, Options{ChunkSize: 4 << 10, CommitInterval: -1})
	o := s.Origin()
	fillAt(t, o, 1, 0, 4096)
	require.EqualValues(t, 1, s.id.durable.Load(), "the write marked sample 0")
	gens := s.sampleGens()
	fillAt(t, o, 2, 0, 4096)
	require.NoError(t, s.origin.Flush())
	require.NoError(t, s.settleSamples(&gens))
	require.EqualValues(t, 1, s.id.durable.Load(), "written since the counts: still dirty")
	require.NoError(t, o.Flush())
	require.Zero(t, s.id.durable.Load(), "a Flush with no write since settles it")

	fillAt(t, o, 3, 0, 4096)
	_, err := s.CreateSnapshot("s", o) // drains and flushes; sample 0 stays dirty
	require.NoError(t, err)
	require.EqualValues(t, 1, s.id.durable.Load())
	fillAt(t, o, 4, 0, 4096) // a copy-on-write: the data waits in the origin buffer
	require.Positive(t, s.ob.n.Load())
	gens = s.sampleGens()
	require.NoError(t, s.origin.Flush())
	require.NoError(t, s.settleSamples(&gens))
	require.EqualValues(t, 1, s.id.durable.Load(), "buffered: still dirty")
	require.NoError(t, o.Flush())
	require.Zero(t, s.id.durable.Load())
}

// BenchmarkTouchSamples is what the origin write path pays for the
// fingerprint on a write that touches no sample (the common case), and on
// one that touches a sample already marked dirty.
func BenchmarkTouchSamples(b *testing.B) {
	s, _, _ := newMemStore(b, 64<<20, 16<<20, Options{ChunkSize: 4 << 10})
	pos, _ := samplePositions(64 << 20)
	require.NoError(b, s.touchSamples(pos[15], 4096))
	for _, bc := range []struct {
		name string
		off  int64
	}{{"miss", pos[15] - 8192}, {"dirty-sample", pos[15]}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for range b.N {
				if err := s.touchSamples(bc.off, 4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Opens racing on one device without flock in this process: exactly one
// wins, the others are refused naming it.
func TestConcurrentOpensOneWins(t *testing.T) {
	origin, store, s := sliceStore(t)
	require.NoError(t, s.Close())
	const n = 4
	type result struct {
		s   *Store
		err error
	}
	out := make(chan result, n)
	for range n {
		o, sv := sliceViews(t, origin, store)
		go func() {
			s, err := Open(o, sv, Options{})
			out <- result{s, err}
		}()
	}
	var won []*Store
	for range n {
		r := <-out
		if r.err == nil {
			won = append(won, r.s)
			continue
		}
		var oe *OwnerError
		require.ErrorAs(t, r.err, &oe)
	}
	require.Len(t, won, 1)
	require.NoError(t, won[0].Close())
}

// The superblock's identity region fields: a store with the region
// decodes and re-encodes to itself; every bit flip is rejected; and
// values that pass the checksum but not the layout (a region elsewhere,
// of another length, half set, or a journal that does not follow it) are
// ErrCorrupt naming byte 160 or 48.
func TestSuperblockIdentityFields(t *testing.T) {
	g := geometry{chunkSize: 64 << 10, originSize: 1 << 30, storeSize: 1 << 30, idOff: superblockSize, idLen: identityLen,
		journalOff: superblockSize + identityLen, journalLen: 1 << 20, metaOff: superblockSize + identityLen + 1<<20,
		metaLen: 1 << 20, dataOff: 3 << 20, dataChunks: (1<<30 - 3<<20) / (64 << 10), version: superblockVersion}
	sb := g.encode()
	got, err := decodeSuperblock(sb)
	require.NoError(t, err)
	require.Equal(t, sb, got.encode())
	for i := 0; i < len(sb)*8; i++ {
		b := bytes.Clone(sb)
		b[i/8] ^= 1 << (i % 8)
		_, err := decodeSuperblock(b)
		require.ErrorIs(t, err, ErrCorrupt, "bit %d", i)
	}
	for _, tc := range []struct {
		name   string
		change func(g *geometry)
		byte   string
	}{
		{"region elsewhere", func(g *geometry) { g.idOff = 8192 }, "byte 160"},
		{"region of another length", func(g *geometry) { g.idLen = 4096 }, "byte 160"},
		{"offset without length", func(g *geometry) { g.idLen = 0 }, "byte 160"},
		{"journal not after it", func(g *geometry) { g.journalOff = superblockSize }, "byte 48"},
	} {
		bad := g
		tc.change(&bad)
		_, err := decodeSuperblock(bad.encode())
		require.ErrorIs(t, err, ErrCorrupt, tc.name)
		require.ErrorContains(t, err, tc.byte, tc.name)
	}
}
