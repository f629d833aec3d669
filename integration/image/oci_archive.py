#!/usr/bin/env python3
"""Writes an OCI image archive (image layout in a tar) holding one layer:
the agent binary at /podgpu-agent and the given shared libraries at their
paths. Deterministic: sorted entries, fixed owners and times, so the same
inputs give the same digests.

usage: oci_archive.py BINARY OUT.tar TAG LIBRARY...
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

EPOCH = 0


def add_file(tar, name, data, mode):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = len(data), mode, EPOCH, 0, 0
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar, name, mode=0o755):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, EPOCH
    tar.addfile(info)


def add_link(tar, name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, EPOCH
    tar.addfile(info)


def layer(binary, libraries):
    files = {"podgpu-agent": (open(binary, "rb").read(), 0o755)}
    for library in libraries:
        real = os.path.realpath(library)
        # Debian's merged /usr: /lib and /lib64 are links into /usr.
        path = library.lstrip("/")
        for prefix in ("lib/", "lib64/"):
            if path.startswith(prefix):
                path = "usr/" + path
        files[path] = (open(real, "rb").read(), 0o755)
    files["etc/nsswitch.conf"] = (b"hosts: files dns\n", 0o644)
    files["etc/passwd"] = (b"root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532::/:/sbin/nologin\n", 0o644)
    files["etc/group"] = (b"root:x:0:\nnonroot:x:65532:\n", 0o644)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = {"tmp", "proc", "sys", "dev", "etc", "usr"}
        for path in files:
            parts = path.split("/")[:-1]
            dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for name in sorted(dirs):
            add_dir(tar, name, 0o1777 if name == "tmp" else 0o755)
        for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64"), ("bin", "usr/bin"), ("sbin", "usr/sbin")):
            add_link(tar, link, target)
        for path in sorted(files):
            data, mode = files[path]
            add_file(tar, path, data, mode)
    diff_id = hashlib.sha256(raw.getvalue()).hexdigest()
    compressed = gzip.compress(raw.getvalue(), mtime=EPOCH)
    return compressed, diff_id


def blob(tar, data):
    digest = hashlib.sha256(data).hexdigest()
    add_file(tar, f"blobs/sha256/{digest}", data, 0o644)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def main():
    binary, out, tag, *libraries = sys.argv[1:]
    compressed, diff_id = layer(binary, libraries)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/podgpu-agent"],
            "Env": ["PATH=/usr/bin", "LD_LIBRARY_PATH=/host-nvidia"],
            "WorkingDir": "/",
            "Labels": {"org.opencontainers.image.title": "podgpu-agent", "org.opencontainers.image.version": tag},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created_by": "scripts/build-image.sh"}],
    }
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        add_file(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644)
        layer_desc = blob(tar, compressed)
        config_desc = blob(tar, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_desc}],
        }
        manifest_desc = blob(tar, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        }
        add_file(tar, "index.json", json.dumps(index, sort_keys=True).encode(), 0o644)


if __name__ == "__main__":
    main()
