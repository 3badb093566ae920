// tarlist: list a tar read from stdin with Go's archive/tar (what Docker and containerd use), one JSON object per
// member, for the differential test of cvmfs-snap's own tar reader (tests/test_tar_differential.py).
// Standard library only; built by the test with the Debian Go toolchain.
package main

import (
	"archive/tar"
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

type member struct {
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Mode     int64             `json:"mode"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Size     int64             `json:"size"`
	MtimeNs  int64             `json:"mtime_ns"`
	Linkname string            `json:"linkname"`
	Major    int64             `json:"devmajor"`
	Minor    int64             `json:"devminor"`
	Xattrs   map[string]string `json:"xattrs"`
	Sha256   string            `json:"sha256"`
}

var kinds = map[byte]string{
	tar.TypeReg: "file", tar.TypeRegA: "file", tar.TypeCont: "file", tar.TypeLink: "hardlink",
	tar.TypeSymlink: "symlink", tar.TypeChar: "char", tar.TypeBlock: "block", tar.TypeDir: "dir",
	tar.TypeFifo: "fifo",
}

func main() {
	tr := tar.NewReader(bufio.NewReader(os.Stdin))
	out := json.NewEncoder(os.Stdout)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "tarlist:", err)
			os.Exit(1)
		}
		h := sha256.New()
		if _, err := io.Copy(h, tr); err != nil {
			fmt.Fprintln(os.Stderr, "tarlist:", err)
			os.Exit(1)
		}
		x := map[string]string{}
		for k, v := range hdr.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") {
				x[strings.TrimPrefix(k, "SCHILY.xattr.")] = hex.EncodeToString([]byte(v))
			}
		}
		kind, ok := kinds[hdr.Typeflag]
		if !ok {
			kind = string([]byte{hdr.Typeflag})
		}
		_ = out.Encode(member{
			Name: hdr.Name, Type: kind, Mode: hdr.Mode, UID: hdr.Uid, GID: hdr.Gid, Size: hdr.Size,
			MtimeNs: hdr.ModTime.UnixNano(), Linkname: hdr.Linkname, Major: hdr.Devmajor, Minor: hdr.Devminor,
			Xattrs: x, Sha256: hex.EncodeToString(h.Sum(nil)),
		})
	}
}
