package codeprep

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

func extractSquashfs(ctx context.Context, dst, path string, lim Limits) error {
	unsquashfs, err := exec.LookPath("unsquashfs")
	if err != nil {
		return errkind.Wrap(errkind.Unavailable, fmt.Errorf("code: squashfs needs unsquashfs (squashfs-tools): %w", err))
	}
	// Check the listing first: unsquashfs would otherwise fill the disk
	// before a bomb could be noticed. normalise checks the result again.
	if err := checkSquashfs(ctx, unsquashfs, path, lim); err != nil {
		return err
	}
	// One processor and small queues: the image is at most a few MiB, and
	// unsquashfs must not take a lot of the host's memory for it.
	cmd := exec.CommandContext(ctx, unsquashfs, "-no-xattrs", "-quiet", "-no-progress",
		"-p", "1", "-da", "8", "-fr", "8", "-d", dst, path)
	cmd.WaitDelay = 5 * time.Second
	out := &headBuffer{max: 4096}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("code: unsquashfs: %w", ctx.Err())
		}
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: unsquashfs: %w: %s", err, bytes.TrimSpace(out.buf.Bytes())))
	}
	return nil
}

// checkSquashfs streams `unsquashfs -lln` through checkSquashfsListing;
// the lister is killed as soon as the listing is refused or ctx ends.
func checkSquashfs(ctx context.Context, unsquashfs, path string, lim Limits) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cmd := exec.CommandContext(ctx, unsquashfs, "-lln", path)
	cmd.WaitDelay = 5 * time.Second
	stderr := &headBuffer{max: 4096}
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("code: list squashfs: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("code: list squashfs: %w", err)
	}
	checkErr := checkSquashfsListing(ctx, stdout, lim)
	if checkErr != nil {
		cancel() // nothing more to read: stop the lister
	}
	waitErr := cmd.Wait()
	switch {
	case checkErr != nil:
		return checkErr
	case ctx.Err() != nil:
		return fmt.Errorf("code: list squashfs: %w", ctx.Err())
	case waitErr != nil:
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: list squashfs: %w: %s", waitErr, bytes.TrimSpace(stderr.buf.Bytes())))
	}
	return nil
}

// checkSquashfsListing reads `unsquashfs -lln` lines such as
//
//	-rw-r--r-- 0/0                3 2024-01-01 00:00 squashfs-root/d/f
//
// one at a time, with bounded memory. Every line must parse strictly: a
// file name holding a newline makes a line that does not (it cannot hold
// the '/' of the owner field), so names cannot forge entries.
func checkSquashfsListing(ctx context.Context, r io.Reader, lim Limits) error {
	// One line holds attributes, a path and a link target.
	maxListingLine := 256 + len(listingRoot) + lim.MaxPathLen + maxLinkTarget
	br := bufio.NewReaderSize(r, maxListingLine+1)
	var total int64
	entries := 0
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			return unsafe(errkind.InvalidInput, "squashfs listing line longer than %d bytes", maxListingLine)
		}
		if len(line) == 0 && errors.Is(err, io.EOF) {
			break
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("code: squashfs listing: %w", err)
		}
		if entries%1024 == 0 {
			if cerr := ctx.Err(); cerr != nil {
				return cerr
			}
		}
		e, perr := parseListingLine(string(bytes.TrimSuffix(line, []byte{'\n'})))
		if perr != nil {
			return perr
		}
		if e.name != "" { // the root itself has no name below the tree
			if err := checkName(e.name, lim); err != nil {
				return err
			}
		}
		entries++
		total += entryCost
		switch e.kind {
		case '-':
			total += e.size
		case 'd':
		case 'l':
			if err := checkLink(e.name, e.target); err != nil {
				return err
			}
		default:
			return unsafe(errkind.InvalidInput, "squashfs holds a special file: %q", e.name)
		}
		if entries > lim.MaxFiles {
			return tooMany(lim.MaxFiles)
		}
		if total > lim.MaxBytes {
			return tooLarge(lim.MaxBytes)
		}
		if err != nil { // io.EOF after a last line without newline
			break
		}
	}
	return nil
}

type listingEntry struct {
	kind   byte   // first letter of the mode: - d l c b p s
	size   int64  // files only
	name   string // relative to the tree's root; "" for the root
	target string // links only
}

const listingRoot = "squashfs-root"

// parseListingLine parses one line; anything unexpected is an error.
func parseListingLine(line string) (listingEntry, error) {
	bad := func(why string) error {
		return unsafe(errkind.InvalidInput, "squashfs listing: %s in line %.200q", why, line)
	}
	var e listingEntry
	if len(line) < 11 || line[10] != ' ' {
		return e, bad("no mode")
	}
	mode := line[:10]
	if !validMode(mode) {
		return e, bad("malformed mode")
	}
	e.kind = mode[0]
	rest := line[11:]
	field := func() string {
		rest = strings.TrimLeft(rest, " ")
		f, r, _ := strings.Cut(rest, " ")
		rest = r
		return f
	}
	owner := field()
	uid, gid, ok := strings.Cut(owner, "/")
	if !ok || !isDigits(uid) || !isDigits(gid) {
		return e, bad("malformed owner")
	}
	size := field()
	if e.kind == 'c' || e.kind == 'b' {
		// "maj, min": refused below as a special file.
		return e, unsafe(errkind.InvalidInput, "squashfs holds a device node: %.200q", line)
	}
	if !isDigits(size) {
		return e, bad("malformed size")
	}
	n, err := strconv.ParseInt(size, 10, 64)
	if err != nil || n < 0 {
		return e, bad("malformed size")
	}
	e.size = n
	date, tm := field(), field()
	if len(date) != 10 || date[4] != '-' || date[7] != '-' || !isDigits(date[:4]+date[5:7]+date[8:]) ||
		len(tm) != 5 || tm[2] != ':' || !isDigits(tm[:2]+tm[3:]) {
		return e, bad("malformed date")
	}
	name := rest // a single space separated it; names may hold spaces
	if e.kind == 'l' {
		n, target, ok := strings.Cut(name, " -> ")
		if !ok {
			return e, bad("link without target")
		}
		name, e.target = n, target
	}
	switch {
	case name == listingRoot:
	case strings.HasPrefix(name, listingRoot+"/"):
		e.name = name[len(listingRoot)+1:]
	default:
		return e, bad("path outside the image's root")
	}
	return e, nil
}

func validMode(m string) bool {
	if !strings.ContainsRune("-dlcbps", rune(m[0])) {
		return false
	}
	for i := 1; i < 10; i++ {
		c := m[i]
		ok := c == '-' || c == "rwxrwxrwx"[i-1] ||
			((i == 3 || i == 6) && (c == 's' || c == 'S')) || (i == 9 && (c == 't' || c == 'T'))
		if !ok {
			return false
		}
	}
	return true
}

func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// headBuffer keeps the first max bytes written to it (a child's error
// output) and discards the rest.
type headBuffer struct {
	buf bytes.Buffer
	max int
}

func (h *headBuffer) Write(p []byte) (int, error) {
	if room := h.max - h.buf.Len(); room > 0 {
		h.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}
