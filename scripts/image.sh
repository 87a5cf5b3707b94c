#!/usr/bin/env bash
# Builds the ApiPolicy image without a container engine: the release binaries, the shared
# libraries they load (as the Dockerfile's distroless base carries them), a nonroot user, and
# nothing else, written as an OCI image (layout and archive) that podman, skopeo, crane,
# containerd (`ctr images import`) and kind (`kind load image-archive`) take. Then it proves the
# image runs: its one layer is unpacked afresh and both binaries answer `--help` inside it
# (chroot, so as root).
#
# Usage: scripts/image.sh [--tag TAG]   (default tag: the workspace version)
# Output: target/oci/apipolicy/ (OCI layout) and target/oci/apipolicy-TAG.tar (OCI archive).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
[[ ${1:-} == --tag ]] && tag=$2
out=target/oci
rootfs=$out/rootfs
rm -rf "$out" && mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp"

echo "building the release binaries"
cargo build --profile dist --locked -p apipolicy-sidecar -p apipolicy-operator
for bin in apipolicy-sidecar apipolicy-operator; do
  cp "target/dist/$bin" "$rootfs/usr/local/bin/$bin"
  strip "$rootfs/usr/local/bin/$bin"
  # The libraries the dynamic loader will look for, at the paths it looks at.
  ldd "target/dist/$bin" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
done
chmod 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  mkdir -p "$rootfs/etc/ssl/certs" && cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
fi

python3 - "$out" "$tag" <<'EOF'
import gzip, hashlib, io, json, os, sys, tarfile

out, tag = sys.argv[1], sys.argv[2]
rootfs = os.path.join(out, "rootfs")
blobs = os.path.join(out, "apipolicy", "blobs", "sha256")
os.makedirs(blobs)

def put(data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}

# One layer, reproducible: sorted entries, fixed times and owners.
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
    for top, dirs, files in os.walk(rootfs):
        dirs.sort()
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(top, name)
            info = tar.gettarinfo(path, os.path.relpath(path, rootfs))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
layer = put(gzip.compress(raw.getvalue(), mtime=0))
layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"

config = put(json.dumps({
    "architecture": "amd64", "os": "linux",
    "config": {"User": "65532:65532", "Entrypoint": ["/usr/local/bin/apipolicy-operator"], "Cmd": ["run"],
               "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "WorkingDir": "/"},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
}, sort_keys=True).encode())
config["mediaType"] = "application/vnd.oci.image.config.v1+json"
manifest = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": config, "layers": [layer]}, sort_keys=True).encode())
manifest["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
manifest["annotations"] = {"org.opencontainers.image.ref.name": tag,
                           "io.containerd.image.name": f"ghcr.io/apipolicy/apipolicy:{tag}"}
layout = os.path.join(out, "apipolicy")
with open(os.path.join(layout, "oci-layout"), "w") as f:
    json.dump({"imageLayoutVersion": "1.0.0"}, f)
with open(os.path.join(layout, "index.json"), "w") as f:
    json.dump({"schemaVersion": 2, "manifests": [manifest]}, f)
with tarfile.open(os.path.join(out, f"apipolicy-{tag}.tar"), "w") as tar:
    tar.add(layout, arcname=".")
print(f"image: {manifest['digest']} ({layer['size'] // 1024} KiB layer)")
EOF

# The proof: unpack the layer the image carries (not the folder it was made from) and run.
check=$(mktemp -d) && chmod 755 "$check"
trap 'rm -rf "$check"' EXIT
layer=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]+"/index.json"))["manifests"][0]["digest"][7:]; print(json.load(open(sys.argv[1]+"/blobs/sha256/"+m))["layers"][0]["digest"][7:])' "$out/apipolicy")
tar -xzf "$out/apipolicy/blobs/sha256/$layer" -C "$check"
for bin in apipolicy-operator apipolicy-sidecar; do
  chroot --userspec=65532:65532 "$check" "/usr/local/bin/$bin" --help | head -1
done
echo "wrote $out/apipolicy (OCI layout) and $out/apipolicy-$tag.tar (OCI archive)"
