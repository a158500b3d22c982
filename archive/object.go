package archive

// Every block and manifest object is stored in one envelope:
//
//	offset  size  meaning
//	0       4     magic "BSAO"
//	4       1     version (1)
//	5       1     flags: bit 0 zstd-compressed, bit 1 AES-256-GCM encrypted
//	6       2     reserved, zero
//	8       4     plaintext length, little endian (at most maxPlain)
//	12      ...   payload
//
// Payload: the plaintext, zstd-compressed when bit 0 is set (a block that
// does not shrink is stored raw). When bit 1 is set the payload is a 12-byte
// random nonce followed by the AES-256-GCM sealing of the (compressed) bytes,
// with the object's key (its name in the repository) as additional data, so
// an object copied under another name fails to open.
//
// Integrity: a block's name is the hash of its plaintext (SHA-256, or
// HMAC-SHA256 under the repository's MAC key when encrypted) and every read
// recomputes it; a manifest carries its own checksum (manifest.go).

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/klauspost/compress/zstd"
)

const (
	objMagic    = "BSAO"
	objHeader   = 12
	flagZstd    = 1
	flagCrypt   = 2
	nonceSize   = 12
	gcmOverhead = 16
	// maxPlain bounds the plaintext an object may claim, so a corrupt
	// header cannot make a reader allocate more than this.
	maxPlain = 1 << 30
)

// codec compresses and encrypts objects. The zstd encoder and decoder are
// safe for concurrent EncodeAll/DecodeAll; aead is nil for a plaintext
// repository.
type codec struct {
	enc  *zstd.Encoder
	dec  *zstd.Decoder
	aead cipher.AEAD
	// bufs recycles compression scratch buffers (block size plus slack),
	// so a backup does not allocate one per block.
	bufs sync.Pool
}

func newCodec(encKey []byte) (*codec, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(maxPlain))
	if err != nil {
		return nil, err
	}
	c := &codec{enc: enc, dec: dec}
	if encKey != nil {
		blk, err := aes.NewCipher(encKey)
		if err != nil {
			return nil, err
		}
		if c.aead, err = cipher.NewGCM(blk); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func (c *codec) close() { c.dec.Close() }

func (c *codec) getBuf(n int) *[]byte {
	if p, ok := c.bufs.Get().(*[]byte); ok && cap(*p) >= n {
		return p
	}
	b := make([]byte, 0, n)
	return &b
}

// seal encodes plain as the object named key into a buffer from the pool;
// the caller returns it with c.bufs.Put after use.
func (c *codec) seal(key string, plain []byte) *[]byte {
	bp := c.getBuf(objHeader + nonceSize + gcmOverhead + len(plain) + len(plain)/8 + 64)
	out := (*bp)[:objHeader]
	copy(out, objMagic)
	out[4] = 1
	out[5], out[6], out[7] = 0, 0, 0
	binary.LittleEndian.PutUint32(out[8:], uint32(len(plain)))
	body := c.enc.EncodeAll(plain, out[objHeader:objHeader])
	if len(body) < len(plain) {
		out[5] |= flagZstd
	} else {
		body = append(out[objHeader:objHeader], plain...)
	}
	if c.aead == nil {
		out = out[:objHeader+len(body)]
		*bp = out
		return bp
	}
	out[5] |= flagCrypt
	// Encrypt out of place into the same buffer past the header: move the
	// compressed body after the nonce first.
	n := len(body)
	out = out[:objHeader+nonceSize+n]
	copy(out[objHeader+nonceSize:], body)
	nonce := out[objHeader : objHeader+nonceSize]
	rand.Read(nonce) // never fails: crypto/rand crashes the program rather than return an error
	sealed := c.aead.Seal(out[objHeader+nonceSize:objHeader+nonceSize], nonce, out[objHeader+nonceSize:], []byte(key))
	out = out[:objHeader+nonceSize+len(sealed)]
	*bp = out
	return bp
}

// open decodes the object named key into dst (reused if large enough) and
// returns the plaintext. Any damage gives an error wrapping ErrCorrupt, a
// failed authentication one wrapping ErrWrongKey only for the config check
// (here a tag mismatch means a damaged or misplaced object: ErrCorrupt).
func (c *codec) open(key string, obj, dst []byte) ([]byte, error) {
	if len(obj) < objHeader || string(obj[:4]) != objMagic || obj[4] != 1 || obj[6] != 0 || obj[7] != 0 {
		return nil, fmt.Errorf("archive: object %s: bad header: %w", key, ErrCorrupt)
	}
	flags := obj[5]
	if flags&^(flagZstd|flagCrypt) != 0 {
		return nil, fmt.Errorf("archive: object %s: unknown flags %#x: %w", key, flags, ErrCorrupt)
	}
	plainLen := int(binary.LittleEndian.Uint32(obj[8:]))
	if plainLen > maxPlain {
		return nil, fmt.Errorf("archive: object %s: length %d: %w", key, plainLen, ErrCorrupt)
	}
	body := obj[objHeader:]
	if flags&flagCrypt != 0 {
		if c.aead == nil {
			return nil, fmt.Errorf("archive: object %s is encrypted but the repository is not: %w", key, ErrCorrupt)
		}
		if len(body) < nonceSize+gcmOverhead {
			return nil, fmt.Errorf("archive: object %s: short: %w", key, ErrCorrupt)
		}
		var err error
		// Decrypt in place: obj is ours (fresh from the backend).
		body, err = c.aead.Open(body[nonceSize:nonceSize], body[:nonceSize], body[nonceSize:], []byte(key))
		if err != nil {
			return nil, fmt.Errorf("archive: object %s: authentication failed: %w", key, ErrCorrupt)
		}
	} else if c.aead != nil {
		return nil, fmt.Errorf("archive: object %s is not encrypted in an encrypted repository: %w", key, ErrCorrupt)
	}
	if cap(dst) < plainLen {
		dst = make([]byte, 0, plainLen)
	}
	dst = dst[:0]
	if flags&flagZstd == 0 {
		if len(body) != plainLen {
			return nil, fmt.Errorf("archive: object %s: length %d, header says %d: %w", key, len(body), plainLen, ErrCorrupt)
		}
		return append(dst, body...), nil
	}
	var h zstd.Header
	if err := h.Decode(body); err != nil || !h.HasFCS || h.FrameContentSize != uint64(plainLen) {
		return nil, fmt.Errorf("archive: object %s: bad zstd frame header: %w", key, ErrCorrupt)
	}
	out, err := c.dec.DecodeAll(body, dst)
	if err != nil || len(out) != plainLen {
		return nil, fmt.Errorf("archive: object %s: decompress: %v: %w", key, err, ErrCorrupt)
	}
	return out, nil
}
