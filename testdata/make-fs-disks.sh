#!/usr/bin/env bash
# Build the disks the FUSE and file-restore tests browse, and keep the source trees to compare
# against.
#
#   testdata/make-fs-disks.sh OUTDIR
#
# OUTDIR/gpt.img   GPT: p1 FAT32 ESP (tree esp), p2 ext4 (tree root: nested dirs, symlinks short
#                  and long, hard links, a sparse file, a 12 MiB file, odd names, a 255-byte
#                  name, empty files, a fifo, owners and modes, nanosecond times, 10,000 files
#                  in one directory), p3 unformatted (random bytes: shows only as p3.img).
# OUTDIR/mbr.img   MBR: p1 FAT16 (tree fat16), p2 NTFS (tree ntfs, written through ntfs-3g),
#                  p3 extended holding p5 ext3 (tree ext3).
# OUTDIR/whole.img one ext2 filesystem without a partition table (tree whole).
# OUTDIR/trees/<name>/  the source trees.
# Needs: sgdisk (gdisk), sfdisk (fdisk), mke2fs (e2fsprogs), mkfs.vfat (dosfstools),
#        mcopy (mtools), mkntfs + ntfs-3g (ntfs-3g), python3; root for ntfs-3g's FUSE mount.
set -euo pipefail
out=${1:?usage: make-fs-disks.sh OUTDIR}
for t in sgdisk sfdisk mke2fs mkfs.vfat mcopy mkntfs ntfs-3g python3; do
  command -v "$t" >/dev/null || { echo "make-fs-disks.sh: $t is missing; run: apt-get install -y gdisk fdisk e2fsprogs dosfstools mtools ntfs-3g python3" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/.work.XXXXXX")
mnt="$work/mnt"
cleanup() {
  mountpoint -q "$mnt" 2>/dev/null && umount "$mnt"
  rm -rf "$work"
}
trap cleanup EXIT
trees="$out/trees"
rm -rf "$trees"; mkdir -p "$trees"

rnd() { python3 -c 'import random,sys; r=random.Random(int(sys.argv[3])); open(sys.argv[1],"wb").write(r.randbytes(int(sys.argv[2])))' "$@"; }

# --- ext4 root: everything a Linux root filesystem holds -------------------------------------
r="$trees/root"
mkdir -p "$r/etc/nginx/sites" "$r/usr/share/doc/a/b/c/d" "$r/home/user/.config" "$r/var/lib/app" "$r/many" "$r/srv/empty-dir"
printf 'server { listen 80; }\n' > "$r/etc/nginx/sites/default"
printf 'UUID=0123 / ext4 defaults 0 1\n' > "$r/etc/fstab"
seq 1 30000 | sed 's/^/line /' > "$r/usr/share/doc/a/b/c/d/deep.txt"
rnd "$r/var/lib/app/data.bin" $((12 << 20)) 11
truncate -s 64M "$r/var/lib/app/sparse.img"
printf 'middle' | dd of="$r/var/lib/app/sparse.img" bs=1 seek=$((20 << 20)) conv=notrunc status=none
: > "$r/home/user/empty"
printf 'x\n' > "$r/home/user/name with spaces & ünïcode ✓"
printf 'long\n' > "$r/home/user/$(printf 'n%.0s' $(seq 1 255))"
printf 'secret\n' > "$r/home/user/.config/token"
ln -s ../../etc/fstab "$r/home/user/fstab-link"
ln -s "/usr/share/doc/a/b/c/d/deep.txt/$(printf 'x%.0s' $(seq 1 80))" "$r/home/user/long-dangling-link"
ln "$r/etc/fstab" "$r/home/user/fstab-hardlink"
ln "$r/etc/fstab" "$r/srv/fstab-hardlink-2"
mkfifo "$r/srv/fifo"
mknod "$r/srv/null-dev" c 1 3
ln -s usr/share/doc "$r/docs-link"
for i in $(seq 1 10000); do printf '%d\n' "$i" > "$r/many/f$i"; done
chown -R 1000:1000 "$r/home/user"
chown 33:33 "$r/var/lib/app/data.bin"
chmod 0600 "$r/home/user/.config/token"
chmod 4755 "$r/usr/share/doc/a/b/c/d/deep.txt"
chmod 0700 "$r/home/user/.config"
touch -h -d '2024-02-29 12:34:56.123456789' "$r/etc/fstab" "$r/home/user/fstab-link" "$r/var/lib/app/data.bin"
touch -d '1999-12-31 23:59:59.5' "$r/usr/share/doc/a/b/c/d"

# --- FAT trees ------------------------------------------------------------------------------
e="$trees/esp"
mkdir -p "$e/EFI/BOOT" "$e/EFI/debian" "$e/Long Directory Name With Spaces"
rnd "$e/EFI/BOOT/BOOTX64.EFI" 300000 7
rnd "$e/EFI/debian/grubx64.efi" 1500000 8
printf 'timeout 3\n' > "$e/loader.conf"
printf 'long name\n' > "$e/Long Directory Name With Spaces/a file with a long name.txt"
: > "$e/EMPTY.TXT"
f16="$trees/fat16"
mkdir -p "$f16/DOCS/SUB"
seq 1 5000 > "$f16/DOCS/SUB/NUMBERS.TXT"
printf 'mixed Case name\n' > "$f16/MixedCase.txt"
rnd "$f16/blob.bin" 700000 9

# --- NTFS and ext3 and whole-disk ext2 trees -------------------------------------------------
n="$trees/ntfs"
mkdir -p "$n/Users/Public/Documents" "$n/Program Files/App"
printf 'windows text\r\n' > "$n/Users/Public/Documents/readme.txt"
rnd "$n/Program Files/App/app.dll" 2500000 12
printf 'small\n' > "$n/Users/Public/tiny.txt"
printf 'ünïcode\n' > "$n/Users/Public/Documents/ünïcode ✓.txt"
: > "$n/empty.txt"
x3="$trees/ext3"
mkdir -p "$x3/data"
rnd "$x3/data/blob" 3000000 13
ln -s blob "$x3/data/link"
w="$trees/whole"
mkdir -p "$w/dir"
printf 'whole disk\n' > "$w/dir/file.txt"
rnd "$w/dir/random" 500000 14

# --- images ---------------------------------------------------------------------------------
fat_img() { # IMG SIZE_KIB FATBITS TREE
  mkfs.vfat -F "$3" -n TEST -C "$1" "$2" >/dev/null
  MTOOLS_SKIP_CHECK=1 mcopy -s -m -i "$1" "$4"/* ::/
}
ext_img() { # IMG TYPE SIZE TREE
  mke2fs -q -F -t "$2" -E root_owner=0:0 -d "$4" "$1" "$3" >/dev/null
}
# MiB offsets: write IMG into DISK at START_MIB
put() { dd if="$2" of="$1" bs=1M seek="$3" conv=notrunc,sparse status=none; }

fat_img "$work/esp.fat" $((64 * 1024)) 32 "$e"
ext_img "$work/root.ext4" ext4 200M "$r"
rm -f "$out/gpt.img"; truncate -s 300M "$out/gpt.img"
sgdisk -n1:1M:+64M -t1:ef00 -c1:ESP -n2:65M:+200M -t2:8300 -c2:root -n3:265M:+16M -t3:8300 -c3:raw "$out/gpt.img" >/dev/null
put "$out/gpt.img" "$work/esp.fat" 1
put "$out/gpt.img" "$work/root.ext4" 65
rnd "$work/raw.bin" $((16 << 20)) 15
put "$out/gpt.img" "$work/raw.bin" 265

fat_img "$work/p1.fat" $((32 * 1024)) 16 "$f16"
truncate -s 64M "$work/p2.ntfs"
mkntfs -F -Q -q -L data "$work/p2.ntfs" >/dev/null
mkdir -p "$mnt"
ntfs-3g "$work/p2.ntfs" "$mnt"
cp -a "$n"/. "$mnt"/
umount "$mnt"
ext_img "$work/p5.ext3" ext3 40M "$x3"
rm -f "$out/mbr.img"; truncate -s 200M "$out/mbr.img"
sfdisk -q "$out/mbr.img" <<'EOF'
label: dos
start=1MiB, size=32MiB, type=6
start=33MiB, size=64MiB, type=7
start=97MiB, size=100MiB, type=5
start=98MiB, size=40MiB, type=83
EOF
put "$out/mbr.img" "$work/p1.fat" 1
put "$out/mbr.img" "$work/p2.ntfs" 33
put "$out/mbr.img" "$work/p5.ext3" 98

ext_img "$out/whole.img" ext2 16M "$w"
ls -ls "$out"/*.img
