package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/blocksnap/blocksnap/archive"
	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot"
)

// Backups in object storage (package archive): backup, restore, archive
// ls|rm|gc|verify, and s3:// sources for hydrate.

// passphraseEnv holds a repository's passphrase when --key-file is not
// given.
const passphraseEnv = "BLOCKSNAP_ARCHIVE_PASSPHRASE"

// repoFlags say how to reach and unlock a repository.
type repoFlags struct {
	endpoint, region, profile, keyFile string
	pathStyle, skipVerify              bool
}

func addRepoFlags(fl *pflag.FlagSet) *repoFlags {
	f := &repoFlags{}
	fl.StringVar(&f.endpoint, "endpoint", "", "S3 endpoint `URL` (default $AWS_ENDPOINT_URL, else AWS)")
	fl.StringVar(&f.region, "region", "", "S3 `REGION` (default $AWS_REGION)")
	fl.StringVar(&f.profile, "profile", "", "`NAME` of the profile in ~/.aws/credentials (default $AWS_PROFILE)")
	fl.BoolVar(&f.pathStyle, "path-style", true, "address buckets as ENDPOINT/BUCKET (MinIO, Ceph, versitygw); false for virtual-hosted style")
	fl.BoolVar(&f.skipVerify, "insecure-skip-verify", false, "accept any TLS certificate")
	fl.StringVar(&f.keyFile, "key-file", "", "read the repository passphrase from `FILE` (default $"+passphraseEnv+"; none: not encrypted)")
	return f
}

func (f *repoFlags) passphrase() ([]byte, error) {
	if f.keyFile != "" {
		return archive.ReadKeyFile(f.keyFile)
	}
	if p := os.Getenv(passphraseEnv); p != "" {
		return []byte(p), nil
	}
	return nil, nil
}

// open opens the repository at location; with create, a missing one is
// created with blockSize.
func (f *repoFlags) open(ctx context.Context, location string, create bool, blockSize int) (*archive.Repo, error) {
	be, err := archive.NewBackend(ctx, location, archive.S3Options{Endpoint: f.endpoint, Region: f.region,
		Profile: f.profile, PathStyle: f.pathStyle, InsecureSkipVerify: f.skipVerify})
	if err != nil {
		return nil, err
	}
	pass, err := f.passphrase()
	if err != nil {
		return nil, err
	}
	r, err := archive.OpenRepo(ctx, be, archive.Options{Passphrase: pass})
	if errors.Is(err, archive.ErrNoRepo) && create {
		return archive.Create(ctx, be, archive.Options{Passphrase: pass, BlockSize: blockSize})
	}
	if errors.Is(err, archive.ErrNeedKey) {
		return nil, fmt.Errorf("%s is encrypted: give --key-file or set $%s", location, passphraseEnv)
	}
	return r, err
}

var cmdBackup = &command{
	name: "backup", args: "SNAPSHOT", lo: 1, hi: 1,
	summary: "back a snapshot up to S3 or a directory (incremental with --from: reads only what changed)",
	long: "The repository (--to s3://BUCKET/PREFIX or a directory) is created on first use, encrypted when a " +
		"passphrase is given (--key-file, $" + passphraseEnv + "). With --from, the backup reads only the blocks " +
		"the store's diff reports changed since that snapshot and references the rest from its newest backup. " +
		"An interrupted backup run again uploads only what is missing.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		sf := addStoreFlags(fl)
		rf := addRepoFlags(fl)
		to := fl.String("to", "", "repository `LOCATION`: s3://BUCKET/PREFIX or a directory")
		required(fl, "to")
		from := fl.String("from", "", "parent `SNAPSHOT`, already backed up to the repository (empty: a full backup)")
		volume := fl.String("volume", "", "the volume's `ID` in the repository (default: the origin's absolute path)")
		bs := &sizeFlag{}
		fl.Var(bs, "block-size", "block size of a new repository (default 64KiB)")
		parallel := fl.Int("parallel", 0, "blocks read and uploaded at once (default 8)")
		js := fl.Bool("json", false, "print the result as JSON")
		return func(e *env, pos []string) error {
			return backup(e, sf, rf, pos[0], *to, *from, *volume, int(bs.n), *parallel, *js)
		}
	},
}

// backupResult is what backup prints.
type backupResult struct {
	ID         string  `json:"id"`
	Parent     string  `json:"parent,omitempty"`
	Snapshot   string  `json:"snapshot"`
	Volume     string  `json:"volume"`
	Size       int64   `json:"size"`
	ReadBytes  int64   `json:"read_bytes"`
	Blocks     int     `json:"blocks"`
	Sent       int     `json:"sent_blocks"`
	Deduped    int     `json:"deduplicated_blocks"`
	Zero       int     `json:"zero_blocks"`
	Stored     int64   `json:"stored_bytes"`
	ElapsedSec float64 `json:"elapsed_seconds"`
}

func backup(e *env, sf *storeFlags, rf *repoFlags, snapName, to, from, volume string, blockSize, parallel int, js bool) error {
	if volume == "" {
		abs, err := filepath.Abs(sf.origin)
		if err != nil {
			return err
		}
		volume = abs
	}
	s, err := openSession(sf, inspect)
	if errors.Is(err, ErrStoreInUse) {
		return inUse(e.ctx, "store", sf.store, sf.controlPath(), inUseAdvice, err)
	}
	if err != nil {
		return err
	}
	defer s.close()
	snap, err := openSnapshot(s.st, snapName, "SNAPSHOT")
	if err != nil {
		return err
	}
	defer snap.Close()
	var parent *snapshot.Volume
	if from != "" {
		if parent, err = openSnapshot(s.st, from, "--from"); err != nil {
			return err
		}
		defer parent.Close()
	}
	repo, err := rf.open(e.ctx, to, true, blockSize)
	if err != nil {
		return err
	}
	defer repo.Close()
	p := newProgress(e, "backup "+snapName)
	res, err := repo.BackupSnapshot(e.ctx, s.st, snap, parent, archive.BackupOptions{Volume: volume, Parallel: parallel,
		Progress: func(pr archive.Progress) { p.update(pr.DoneBytes, pr.TotalBytes) }})
	p.done()
	if err != nil {
		return err
	}
	m, pr := res.Manifest, res.Progress
	out := backupResult{ID: m.ID, Parent: m.Parent, Snapshot: m.Snapshot, Volume: m.Volume, Size: m.Size,
		ReadBytes: pr.TotalBytes, Blocks: pr.Blocks, Sent: pr.Uploaded, Deduped: pr.Deduped, Zero: pr.Zero,
		Stored: pr.StoredBytes, ElapsedSec: pr.Elapsed.Seconds()}
	if js {
		return writeJSON(e.stdout, out)
	}
	kind := "full backup"
	if m.Parent != "" {
		kind = "incremental backup (parent " + m.Parent + ")"
	}
	_, err = fmt.Fprintf(e.stdout, "%s %s of %s: read %s of %s, %d blocks sent (%s stored), %d already there, %d zero, in %s\n",
		kind, m.ID, snapName, human(pr.TotalBytes), human(m.Size), pr.Uploaded, human(pr.StoredBytes), pr.Deduped, pr.Zero,
		pr.Elapsed.Round(time.Millisecond))
	return err
}

var cmdRestore = &command{
	name: "restore", args: "LOCATION/BACKUP", lo: 1, hi: 1,
	summary: "restore a backup onto a file or device, verifying every block (holes stay holes)",
	long:    "A missing file is created with the backup's size. --resume skips blocks the target already holds.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		rf := addRepoFlags(fl)
		to := fl.String("to", "", "target `PATH` (file or block device)")
		required(fl, "to")
		resume := fl.Bool("resume", false, "skip blocks the target already holds (an interrupted restore)")
		parallel := fl.Int("parallel", 0, "blocks fetched and written at once (default 8)")
		js := fl.Bool("json", false, "print the result as JSON")
		return func(e *env, pos []string) error { return restore(e, rf, pos[0], *to, *resume, *parallel, *js) }
	},
}

// restoreResult is what restore prints.
type restoreResult struct {
	ID         string  `json:"id"`
	Target     string  `json:"target"`
	Size       int64   `json:"size"`
	Written    int     `json:"written_blocks"`
	Skipped    int     `json:"skipped_blocks"`
	Zero       int     `json:"zero_blocks"`
	Fetched    int64   `json:"fetched_bytes"`
	ElapsedSec float64 `json:"elapsed_seconds"`
}

func restore(e *env, rf *repoFlags, backup, to string, resume bool, parallel int, js bool) error {
	location, id, err := archive.SplitBackup(backup)
	if err != nil {
		return usagef("%s: give LOCATION/BACKUP, such as s3://bucket/prefix/ID", backup)
	}
	repo, err := rf.open(e.ctx, location, false, 0)
	if err != nil {
		return err
	}
	defer repo.Close()
	m, err := repo.Manifest(e.ctx, id)
	if err != nil {
		return err
	}
	var dst *blockdev.File
	if _, serr := os.Stat(to); errors.Is(serr, fs.ErrNotExist) {
		dst, err = blockdev.Create(to, m.Size, blockdev.FileOptions{})
	} else {
		dst, err = blockdev.Open(to, blockdev.FileOptions{})
	}
	if err != nil {
		return err
	}
	p := newProgress(e, "restore "+id)
	pr, err := repo.Restore(e.ctx, id, dst, archive.RestoreOptions{Resume: resume, Parallel: parallel,
		Progress: func(pr archive.Progress) { p.update(pr.DoneBytes, pr.TotalBytes) }})
	p.done()
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	out := restoreResult{ID: id, Target: to, Size: m.Size, Written: pr.Uploaded, Skipped: pr.Deduped, Zero: pr.Zero,
		Fetched: pr.StoredBytes, ElapsedSec: pr.Elapsed.Seconds()}
	if js {
		return writeJSON(e.stdout, out)
	}
	_, err = fmt.Fprintf(e.stdout, "restored %s onto %s: %d blocks written (%s fetched), %d already there, %d zero, in %s\n",
		id, to, pr.Uploaded, human(pr.StoredBytes), pr.Deduped, pr.Zero, pr.Elapsed.Round(time.Millisecond))
	return err
}

var cmdArchive = &command{
	name: "archive", args: "ls|rm|gc|verify LOCATION[/BACKUP]", lo: 2, hi: 2,
	summary: "list, delete, garbage-collect or verify the backups in a repository",
	long: "ls LOCATION lists the backups; rm LOCATION/BACKUP deletes one (its blocks stay until gc); " +
		"gc LOCATION deletes the blocks no backup references (it waits for no backup: it fails while one runs); " +
		"verify LOCATION checks that every referenced block exists, and with --read-data (or --sample) that it " +
		"matches its hash, naming each bad block's backup and offset.",
	define: func(fl *pflag.FlagSet) func(*env, []string) error {
		rf := addRepoFlags(fl)
		dry := fl.Bool("dry-run", false, "gc: count what would be deleted, delete nothing")
		readData := fl.Bool("read-data", false, "verify: download every block and check its hash")
		sample := fl.Float64("sample", 0, "verify: download this `FRACTION` of the blocks (0 to 1)")
		js := fl.Bool("json", false, "print the result as JSON")
		return func(e *env, pos []string) error {
			return archiveOp(e, rf, pos[0], pos[1], *dry, *readData, *sample, *js)
		}
	},
}

// backupInfo is one line of archive ls.
type backupInfo struct {
	ID       string    `json:"id"`
	Parent   string    `json:"parent,omitempty"`
	Volume   string    `json:"volume"`
	Snapshot string    `json:"snapshot"`
	Created  time.Time `json:"created"`
	Size     int64     `json:"size"`
}

func archiveOp(e *env, rf *repoFlags, op, location string, dry, readData bool, sample float64, js bool) error {
	id := ""
	if op == "rm" {
		var err error
		if location, id, err = archive.SplitBackup(location); err != nil {
			return usagef("archive rm: give LOCATION/BACKUP, such as s3://bucket/prefix/ID")
		}
	}
	switch op {
	case "ls", "rm", "gc", "verify":
	default:
		return usagef("archive: unknown operation %q (ls, rm, gc or verify)", op)
	}
	repo, err := rf.open(e.ctx, location, false, 0)
	if err != nil {
		return err
	}
	defer repo.Close()
	var out any
	switch op {
	case "ls":
		ms, err := repo.Backups(e.ctx)
		if err != nil {
			return err
		}
		list := make([]backupInfo, 0, len(ms))
		for _, m := range ms {
			list = append(list, backupInfo{ID: m.ID, Parent: m.Parent, Volume: m.Volume, Snapshot: m.Snapshot, Created: m.Created, Size: m.Size})
		}
		if !js {
			tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "BACKUP\tCREATED\tSNAPSHOT\tSIZE\tPARENT\tVOLUME")
			for _, b := range list {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", b.ID, b.Created.Format(time.RFC3339), b.Snapshot, human(b.Size),
					cmpOr(b.Parent, "-"), b.Volume)
			}
			return tw.Flush()
		}
		out = list
	case "rm":
		if err := repo.DeleteBackup(e.ctx, id); err != nil {
			return err
		}
		out = map[string]string{"deleted": id}
		if !js {
			_, err := fmt.Fprintf(e.stdout, "deleted backup %s (run archive gc to free its blocks)\n", id)
			return err
		}
	case "gc":
		res, err := repo.GC(e.ctx, archive.GCOptions{DryRun: dry})
		if errors.Is(err, archive.ErrLocked) {
			return fmt.Errorf("%w: a backup is running; try again when it ends", err)
		}
		if err != nil {
			return err
		}
		out = res
		if !js {
			verb := "deleted"
			if dry {
				verb = "would delete"
			}
			_, err := fmt.Fprintf(e.stdout, "%d backups reference %d blocks; %s %d unreferenced blocks (%s), %d packs rewritten, %d orphan packs\n",
				res.Backups, res.Referenced, verb, res.Unreferenced, human(res.DeletedBytes), res.PacksRewritten, res.Orphans)
			return err
		}
	case "verify":
		res, verr := repo.Verify(e.ctx, archive.VerifyOptions{ReadData: readData, Sample: sample})
		if res == nil {
			return verr
		}
		if js {
			if err := writeJSON(e.stdout, res); err != nil {
				return err
			}
		} else {
			for _, p := range res.Problems {
				fmt.Fprintf(e.stdout, "bad: backup %s block %d at offset %d: %v\n", p.Backup, p.Index, p.Offset, p.Err)
			}
			fmt.Fprintf(e.stdout, "%d backups, %d blocks checked to exist, %d read and hashed, %d bad\n",
				res.Backups, res.Blocks, res.Read, len(res.Problems))
		}
		return verr
	}
	return writeJSON(e.stdout, out)
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// isArchive reports whether a hydrate source is a backup in S3.
func isArchive(src string) bool { return strings.HasPrefix(src, "s3://") }

// archiveSource is a backup opened lazily as a clone's source; closing it
// closes the repository too.
type archiveSource struct {
	*archive.Image
	repo *archive.Repo
}

func (a *archiveSource) Close() error {
	err := a.Image.Close()
	a.repo.Close()
	return err
}

// openArchiveSource opens s3://BUCKET/PREFIX/BACKUP lazily: blocks are
// fetched as the clone reads or hydrates them, through a cache in the
// temporary directory. Credentials and the endpoint come from the AWS
// environment variables, the passphrase from $BLOCKSNAP_ARCHIVE_PASSPHRASE.
func openArchiveSource(ctx context.Context, src string) (blockdev.Device, error) {
	location, id, err := archive.SplitBackup(src)
	if err != nil {
		return nil, usagef("source %s: give s3://BUCKET/PREFIX/BACKUP", src)
	}
	rf := &repoFlags{pathStyle: true}
	repo, err := rf.open(ctx, location, false, 0)
	if err != nil {
		return nil, fmt.Errorf("source %s: %w", src, err)
	}
	img, err := archive.Open(ctx, repo, id, os.TempDir())
	if err != nil {
		repo.Close()
		return nil, fmt.Errorf("source %s: %w", src, err)
	}
	return &archiveSource{Image: img, repo: repo}, nil
}
