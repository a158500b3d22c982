package archive

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"iter"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Backend is where a repository's objects live: a bucket and prefix in
// S3-compatible storage, or a local directory. It is deliberately small (whole
// objects in and out, a listing, a delete) so that other stores can be added;
// everything the repository needs on top (naming, immutability, locking) is
// built from these five calls.
//
// Keys are slash-separated relative names such as "blocks/ab/abcd..."; a
// backend maps them under its own root or prefix. Put replaces nothing the
// repository cares about: repository objects are only ever created or
// deleted, never rewritten (locks, which are not repository data, are the one
// exception). A Put must be atomic: a reader sees the whole object or none.
type Backend interface {
	// Put stores data under key.
	Put(ctx context.Context, key string, data []byte) error
	// Get returns the whole object, or an error wrapping ErrNotFound.
	Get(ctx context.Context, key string) ([]byte, error)
	// GetRange returns n bytes of the object at off (fewer only at its
	// end), or an error wrapping ErrNotFound.
	GetRange(ctx context.Context, key string, off, n int64) ([]byte, error)
	// List yields the objects whose keys start with prefix, in key order.
	List(ctx context.Context, prefix string) iter.Seq2[ObjectInfo, error]
	// Delete removes key; deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
}

// ObjectInfo describes one listed object.
type ObjectInfo struct {
	Key     string
	Size    int64
	ModTime time.Time
}

// Dir is a Backend over a local directory (a NAS mount, a test). Objects are
// files under the root; Put writes a temporary file, syncs it, renames it
// into place and syncs the directory, so a crash leaves the old state or the
// new, never a torn object, and an object Put returned for stays.
type Dir struct {
	root string
}

// NewDir returns a Dir backend rooted at root, creating the directory if it
// does not exist.
func NewDir(root string) (*Dir, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("archive: dir backend: %w", err)
	}
	return &Dir{root: root}, nil
}

func (d *Dir) path(key string) (string, error) {
	if key == "" || strings.HasPrefix(key, "/") || strings.Contains(key, "..") || strings.Contains(key, "\\") {
		return "", fmt.Errorf("archive: dir backend: key %q: %w", key, ErrBadKey)
	}
	return filepath.Join(d.root, filepath.FromSlash(key)), nil
}

// Put implements Backend.
func (d *Dir) Put(ctx context.Context, key string, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := d.path(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("archive: put %s: %w", key, err)
	}
	f, err := os.CreateTemp(filepath.Dir(p), ".tmp-*")
	if err != nil {
		return fmt.Errorf("archive: put %s: %w", key, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("archive: put %s: %w", key, err)
	}
	// The rename is durable once the directory is synced: a manifest must
	// not survive a crash that its blocks' packs do not.
	if err := syncDir(filepath.Dir(p)); err != nil {
		return fmt.Errorf("archive: put %s: %w", key, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Get implements Backend.
func (d *Dir) Get(ctx context.Context, key string) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := d.path(key)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("archive: get %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("archive: get %s: %w", key, err)
	}
	return b, nil
}

// GetRange implements Backend.
func (d *Dir) GetRange(ctx context.Context, key string, off, n int64) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if off < 0 || n < 0 {
		return nil, fmt.Errorf("archive: get %s range %d+%d: %w", key, off, n, ErrBadKey)
	}
	p, err := d.path(key)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("archive: get %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("archive: get %s: %w", key, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("archive: get %s: %w", key, err)
	}
	if off > st.Size() {
		off = st.Size()
	}
	n = min(n, st.Size()-off)
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil && err != io.EOF {
		return nil, fmt.Errorf("archive: get %s: %w", key, err)
	}
	return b, nil
}

// List implements Backend. Temporary files of interrupted Puts are skipped.
func (d *Dir) List(ctx context.Context, prefix string) iter.Seq2[ObjectInfo, error] {
	return func(yield func(ObjectInfo, error) bool) {
		// Walk from the deepest directory the prefix names, so a listing of
		// "blocks/ab/" does not visit every other block directory.
		start := d.root
		if i := strings.LastIndex(prefix, "/"); i >= 0 {
			start = filepath.Join(d.root, filepath.FromSlash(prefix[:i]))
		}
		err := filepath.WalkDir(start, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
			rel, rerr := filepath.Rel(d.root, p)
			if rerr != nil {
				return rerr
			}
			key := filepath.ToSlash(rel)
			if e.IsDir() {
				if key != "." && !strings.HasPrefix(key+"/", prefix) && !strings.HasPrefix(prefix, key+"/") {
					return filepath.SkipDir
				}
				return nil
			}
			if !strings.HasPrefix(key, prefix) || strings.HasPrefix(e.Name(), ".tmp-") {
				return nil
			}
			info, ierr := e.Info()
			if ierr != nil {
				if errors.Is(ierr, fs.ErrNotExist) {
					return nil
				}
				return ierr
			}
			if !yield(ObjectInfo{Key: key, Size: info.Size(), ModTime: info.ModTime()}, nil) {
				return errStop
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStop) {
			yield(ObjectInfo{}, fmt.Errorf("archive: list %s: %w", prefix, err))
		}
	}
}

var errStop = errors.New("stop")

// Delete implements Backend.
func (d *Dir) Delete(ctx context.Context, key string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := d.path(key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("archive: delete %s: %w", key, err)
	}
	return nil
}
