// Package archive keeps snapshot backups in S3-compatible object storage or a
// local directory: incremental by the blocks a snapshot store reports changed,
// deduplicated by content, zstd-compressed, optionally encrypted with
// AES-256-GCM. A backup restores onto any blockdev.Device, or opens lazily as a
// read-only Device that fetches blocks on demand (instant restore, a clone
// source). docs/archive.md describes the repository layout.
package archive

// The repository's config object, key "config", is written once by Create:
//
//	offset  size  meaning
//	0       8     magic "BSARCFG1"
//	8       4     length L of the JSON body, little endian (at most 64 KiB)
//	12      L     JSON: repoConfig below
//	12+L    32    SHA-256 of bytes [0, 12+L)
//
// The config is never encrypted (it holds the KDF salt and the wrapped key);
// everything it says that matters is covered by the key check: a wrong
// passphrase fails to unwrap the master key (ErrWrongKey).

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/crypto/scrypt"
)

// Sentinel errors; callers test them with errors.Is.
var (
	ErrNotFound  = errors.New("archive: not found")
	ErrNoBucket  = errors.New("archive: bucket does not exist")
	ErrBadKey    = errors.New("archive: bad object key or range")
	ErrCorrupt   = errors.New("archive: corrupt object")
	ErrWrongKey  = errors.New("archive: wrong passphrase or key file")
	ErrNeedKey   = errors.New("archive: repository is encrypted and no passphrase was given")
	ErrNoRepo    = errors.New("archive: no repository here")
	ErrExists    = errors.New("archive: repository already exists")
	ErrBadParent = errors.New("archive: parent backup does not match")
	ErrLocked    = errors.New("archive: repository is locked")
	ErrOptions   = errors.New("archive: bad options")
)

const (
	cfgMagic   = "BSARCFG1"
	cfgKey     = "config"
	formatV1   = 1
	maxCfgJSON = 64 << 10
	// DefaultBlockSize is the unit of deduplication, upload and lazy fetch.
	// docs/archive.md has the measurement behind it.
	DefaultBlockSize = 64 << 10
	minBlockSize     = 4 << 10
	maxBlockSize     = 16 << 20
	wrapAAD          = "blocksnap archive master key"
)

type repoConfig struct {
	Format      int        `json:"format"`
	ID          string     `json:"id"`
	Created     time.Time  `json:"created"`
	BlockSize   int        `json:"block_size"`
	Hash        string     `json:"hash"`        // "sha256" or "hmac-sha256"
	Compression string     `json:"compression"` // "zstd"
	Encryption  *cryptoCfg `json:"encryption,omitempty"`
}

type cryptoCfg struct {
	Cipher     string `json:"cipher"` // "aes-256-gcm"
	KDF        string `json:"kdf"`    // "scrypt"
	Salt       []byte `json:"salt"`
	N          int    `json:"n"`
	R          int    `json:"r"`
	P          int    `json:"p"`
	WrappedKey []byte `json:"wrapped_key"` // nonce || GCM(KEK, master key)
}

// Options configures Create and OpenRepo. The zero value is a plaintext
// repository with the default block size.
type Options struct {
	// BlockSize (Create only): a power of two from 4 KiB to 16 MiB; 0
	// means DefaultBlockSize.
	BlockSize int
	// Passphrase, if set, encrypts the repository (Create) or unlocks it
	// (OpenRepo). ReadKeyFile reads one from a file.
	Passphrase []byte
	// ScryptN is the scrypt cost (Create only); 0 means 32768. Tests lower
	// it.
	ScryptN int
}

// ReadKeyFile reads a passphrase from a key file (its whole contents, a
// trailing newline removed).
func ReadKeyFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("archive: key file: %w", err)
	}
	b = bytes.TrimSuffix(b, []byte("\n"))
	if len(b) == 0 {
		return nil, fmt.Errorf("archive: key file %s is empty: %w", path, ErrOptions)
	}
	return b, nil
}

// Repo is an open repository. It is safe for concurrent use.
type Repo struct {
	be     Backend
	cfg    repoConfig
	macKey []byte // nil: block names are plain SHA-256
	codec  *codec
	idx    index
	// hashers recycles *hasher (each holds a block of zeros to compare
	// against), so verifying a fetched block allocates nothing.
	hashers sync.Pool
}

func (r *Repo) getHasher() *hasher {
	if h, ok := r.hashers.Get().(*hasher); ok {
		return h
	}
	return r.newHasher()
}

// Create writes a new repository's config to be and opens it. It fails with
// ErrExists if one is there.
func Create(ctx context.Context, be Backend, o Options) (*Repo, error) {
	if _, err := be.Get(ctx, cfgKey); err == nil {
		return nil, ErrExists
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	bs := o.BlockSize
	if bs == 0 {
		bs = DefaultBlockSize
	}
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("archive: block size %d: %w", bs, ErrOptions)
	}
	cfg := repoConfig{Format: formatV1, ID: randomHex(16), Created: time.Now().UTC(), BlockSize: bs,
		Hash: "sha256", Compression: "zstd"}
	var master []byte
	if o.Passphrase != nil {
		n := o.ScryptN
		if n == 0 {
			n = 1 << 15
		}
		c := &cryptoCfg{Cipher: "aes-256-gcm", KDF: "scrypt", Salt: make([]byte, 32), N: n, R: 8, P: 1}
		rand.Read(c.Salt)
		kek, err := scrypt.Key(o.Passphrase, c.Salt, c.N, c.R, c.P, 32)
		if err != nil {
			return nil, fmt.Errorf("archive: scrypt: %v: %w", err, ErrOptions)
		}
		master = make([]byte, 64)
		rand.Read(master)
		aead := mustGCM(kek)
		nonce := make([]byte, nonceSize)
		rand.Read(nonce)
		c.WrappedKey = aead.Seal(nonce, nonce, master, []byte(wrapAAD))
		cfg.Encryption = c
		cfg.Hash = "hmac-sha256"
	}
	if err := be.Put(ctx, cfgKey, encodeConfig(cfg)); err != nil {
		return nil, err
	}
	return newRepo(be, cfg, master)
}

// OpenRepo opens the repository in be. An encrypted one needs
// o.Passphrase (ErrNeedKey without, ErrWrongKey with a wrong one).
func OpenRepo(ctx context.Context, be Backend, o Options) (*Repo, error) {
	b, err := be.Get(ctx, cfgKey)
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%w (no config object)", ErrNoRepo)
	}
	if err != nil {
		return nil, err
	}
	cfg, err := decodeConfig(b)
	if err != nil {
		return nil, err
	}
	var master []byte
	if c := cfg.Encryption; c != nil {
		if o.Passphrase == nil {
			return nil, ErrNeedKey
		}
		kek, err := scrypt.Key(o.Passphrase, c.Salt, c.N, c.R, c.P, 32)
		if err != nil {
			return nil, fmt.Errorf("archive: config: scrypt parameters: %v: %w", err, ErrCorrupt)
		}
		if len(c.WrappedKey) < nonceSize {
			return nil, fmt.Errorf("archive: config: wrapped key: %w", ErrCorrupt)
		}
		master, err = mustGCM(kek).Open(nil, c.WrappedKey[:nonceSize], c.WrappedKey[nonceSize:], []byte(wrapAAD))
		if err != nil || len(master) != 64 {
			return nil, ErrWrongKey
		}
	}
	return newRepo(be, cfg, master)
}

func newRepo(be Backend, cfg repoConfig, master []byte) (*Repo, error) {
	r := &Repo{be: be, cfg: cfg}
	r.idx.perPack = make(map[string][]idxEntryT)
	r.idx.blocks = make(map[Hash]loc)
	var encKey []byte
	if master != nil {
		encKey, r.macKey = master[:32], master[32:]
	}
	c, err := newCodec(encKey)
	if err != nil {
		return nil, err
	}
	r.codec = c
	return r, nil
}

// Close releases the repository's decoders. Devices opened on it must be
// closed first.
func (r *Repo) Close() error {
	r.codec.close()
	return nil
}

// BlockSize is the repository's block size in bytes.
func (r *Repo) BlockSize() int { return r.cfg.BlockSize }

// Encrypted reports whether the repository is encrypted.
func (r *Repo) Encrypted() bool { return r.cfg.Encryption != nil }

// Backend returns the backend the repository lives in.
func (r *Repo) Backend() Backend { return r.be }

func mustGCM(key []byte) cipher.AEAD {
	blk, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // key is always 32 bytes here
	}
	a, err := cipher.NewGCM(blk)
	if err != nil {
		panic(err)
	}
	return a
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func encodeConfig(cfg repoConfig) []byte {
	js, err := json.Marshal(cfg)
	if err != nil {
		panic(err) // plain struct: cannot fail
	}
	out := make([]byte, 12, 12+len(js)+32)
	copy(out, cfgMagic)
	binary.LittleEndian.PutUint32(out[8:], uint32(len(js)))
	out = append(out, js...)
	sum := sha256.Sum256(out)
	return append(out, sum[:]...)
}

func decodeConfig(b []byte) (repoConfig, error) {
	var cfg repoConfig
	if len(b) < 12+32 || string(b[:8]) != cfgMagic {
		return cfg, fmt.Errorf("archive: config: bad magic: %w", ErrCorrupt)
	}
	n := binary.LittleEndian.Uint32(b[8:])
	if n > maxCfgJSON || int(n) != len(b)-12-32 {
		return cfg, fmt.Errorf("archive: config: length %d: %w", n, ErrCorrupt)
	}
	sum := sha256.Sum256(b[:12+n])
	if !bytes.Equal(sum[:], b[12+n:]) {
		return cfg, fmt.Errorf("archive: config: checksum mismatch: %w", ErrCorrupt)
	}
	if err := json.Unmarshal(b[12:12+n], &cfg); err != nil {
		return cfg, fmt.Errorf("archive: config: %v: %w", err, ErrCorrupt)
	}
	if cfg.Format != formatV1 {
		return cfg, fmt.Errorf("archive: config: format %d not supported: %w", cfg.Format, ErrCorrupt)
	}
	bs := cfg.BlockSize
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 || cfg.Compression != "zstd" {
		return cfg, fmt.Errorf("archive: config: block size %d, compression %q: %w", bs, cfg.Compression, ErrCorrupt)
	}
	if c := cfg.Encryption; c != nil {
		// Bound scrypt's cost so a hostile config cannot make OpenRepo
		// allocate gigabytes (128*N*r bytes).
		if c.Cipher != "aes-256-gcm" || c.KDF != "scrypt" || c.N < 2 || c.N > 1<<20 || c.R < 1 || c.R > 32 ||
			c.P < 1 || c.P > 16 || cfg.Hash != "hmac-sha256" {
			return cfg, fmt.Errorf("archive: config: encryption parameters: %w", ErrCorrupt)
		}
	} else if cfg.Hash != "sha256" {
		return cfg, fmt.Errorf("archive: config: hash %q: %w", cfg.Hash, ErrCorrupt)
	}
	return cfg, nil
}
