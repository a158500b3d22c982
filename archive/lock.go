package archive

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// DefaultLockTTL is how long a lock object counts after its last refresh.
// Holders refresh it every third of that.
const DefaultLockTTL = 5 * time.Minute

// ErrLockLost: a backup or GC could not refresh its lock for half the TTL
// and stopped, since a GC (or a backup) may since have started.
var ErrLockLost = errors.New("archive: lock lost (could not refresh it)")

// Locks make GC safe against a concurrent backup, which may decide a block
// is already present (and not upload it) just as the GC decides that block
// is unreferenced. Both sides write their lock object first and list the
// others second; with the strongly consistent listings S3, MinIO and
// versitygw give, at least one of two racing parties sees the other and
// backs off with ErrLocked. Backups do not exclude each other. A lock whose
// object was last written more than its TTL before the newest one is stale
// (its holder died) and is ignored. Lock objects are the one thing in a
// repository that is rewritten (to refresh them); they carry no data.
type lockHandle struct {
	r      *Repo
	key    string
	stop   chan struct{}
	wg     sync.WaitGroup
	onLost func(error)
}

type lockBody struct {
	Kind string    `json:"kind"`
	Host string    `json:"host"`
	PID  int       `json:"pid"`
	Time time.Time `json:"time"`
}

func (r *Repo) lock(ctx context.Context, kind string, ttl time.Duration, onLost func(error)) (*lockHandle, error) {
	if ttl <= 0 {
		ttl = DefaultLockTTL
	}
	host, _ := os.Hostname()
	body := func() []byte {
		b, _ := json.Marshal(lockBody{Kind: kind, Host: host, PID: os.Getpid(), Time: time.Now().UTC()})
		return b
	}
	l := &lockHandle{r: r, key: "locks/" + kind + "-" + randomHex(8), stop: make(chan struct{}), onLost: onLost}
	if err := r.be.Put(ctx, l.key, body()); err != nil {
		return nil, err
	}
	held, err := r.liveLocks(ctx, l.key, ttl)
	if err == nil {
		for _, k := range held {
			if kind == "gc" || strings.HasPrefix(k, "locks/gc-") {
				err = fmt.Errorf("archive: %s holds the repository: %w", k, ErrLocked)
				break
			}
		}
	}
	if err != nil {
		r.be.Delete(context.WithoutCancel(ctx), l.key)
		return nil, err
	}
	l.wg.Go(func() {
		t := time.NewTicker(ttl / 3)
		defer t.Stop()
		last := time.Now()
		for {
			select {
			case <-l.stop:
				return
			case <-t.C:
			}
			if r.be.Put(ctx, l.key, body()) == nil {
				last = time.Now()
			} else if time.Since(last) > ttl/2 {
				l.onLost(ErrLockLost)
				return
			}
		}
	})
	return l, nil
}

// liveLocks lists the lock objects other than own that are not stale,
// judged by the servers' modification times against own's.
func (r *Repo) liveLocks(ctx context.Context, own string, ttl time.Duration) ([]string, error) {
	var all []ObjectInfo
	var now time.Time
	for o, err := range r.be.List(ctx, "locks/") {
		if err != nil {
			return nil, err
		}
		if o.Key == own {
			now = o.ModTime
		}
		all = append(all, o)
	}
	if now.IsZero() {
		now = time.Now()
	}
	var live []string
	for _, o := range all {
		if o.Key != own && now.Sub(o.ModTime) < ttl {
			live = append(live, o.Key)
		}
	}
	return live, nil
}

func (l *lockHandle) release() {
	close(l.stop)
	l.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l.r.be.Delete(ctx, l.key) // a lock left behind goes stale after its TTL
}
