#!/usr/bin/env bash
# Build the test disks: real GPT images with a FAT32 ESP and an ext4 root populated from a
# directory tree, with holes.
#
#   testdata/make-disks.sh OUTDIR [SIZE_MIB]
#
# OUTDIR/base.img     GPT: p1 FAT32 (64 MiB, a few files), p2 ext4 (a tree of real files:
#                     Python's standard library, a seeded random file, symlinks, hard links),
#                     the rest of the disk unallocated (holes).
# OUTDIR/second.img   another VM: the same layout, much of the same tree plus files of its own.
# OUTDIR/nextday.img  base.img a day later: files added, changed and removed inside the ext4.
# Needs: sgdisk (gdisk), mke2fs/debugfs (e2fsprogs), mkfs.vfat (dosfstools), mcopy (mtools), python3.
set -euo pipefail
out=${1:?usage: make-disks.sh OUTDIR [SIZE_MIB]}
size_mib=${2:-256}
for t in sgdisk mke2fs debugfs mkfs.vfat mcopy python3; do
  command -v "$t" >/dev/null || { echo "make-disks.sh: $t is missing; run: apt-get install -y gdisk e2fsprogs dosfstools mtools python3" >&2; exit 1; }
done
mkdir -p "$out"
work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
export SOURCE_DATE_EPOCH=1700000000 E2FSPROGS_FAKE_TIME=1700000000

pylib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
ext_mib=$(( size_mib - 65 - 4 ))

# seeded pseudo-random bytes: NAME SIZE SEED
rnd() { python3 -c 'import random,sys; r=random.Random(int(sys.argv[3])); open(sys.argv[1],"wb").write(r.randbytes(int(sys.argv[2])))' "$@"; }

make_tree() { # DIR FLAVOUR
  local d=$1
  mkdir -p "$d/usr/lib" "$d/etc" "$d/var/log" "$d/home/user"
  mkdir -p "$d/usr/lib/python3"
  tar -C "$pylib" --exclude=__pycache__ --exclude=site-packages --exclude=test --exclude=idlelib \
    --exclude=tkinter --exclude=config-3.\* -cf - . | tar -C "$d/usr/lib/python3" -xf -
  rnd "$d/var/lib.bin" $((6 << 20)) 1
  printf 'hostname %s\n' "$2" > "$d/etc/hostname"
  seq 1 200000 | sed "s/^/kernel: log line /" > "$d/var/log/messages"
  ln -s ../usr/lib/python3/os.py "$d/etc/os-link"
  ln "$d/etc/hostname" "$d/home/user/hostname-hardlink"
  truncate -s 20M "$d/home/user/sparse-file"
  printf 'odd name\n' > "$d/home/user/name with spaces & ünïcode"
}

make_fat() { # IMG
  mkfs.vfat -F 32 -n ESP -s 1 -C "$1" $((64 * 1024)) >/dev/null
  mkdir -p "$work/esp/EFI/BOOT"
  rnd "$work/esp/EFI/BOOT/BOOTX64.EFI" 300000 7
  printf 'timeout 3\n' > "$work/esp/loader.conf"
  MTOOLS_SKIP_CHECK=1 mcopy -s -i "$1" "$work/esp/EFI" "$work/esp/loader.conf" ::/
}

assemble() { # DISK FAT EXT4
  rm -f "$1"; truncate -s "${size_mib}M" "$1"
  sgdisk -U 11111111-2222-3333-4444-555555555555 \
    -n1:2048:+64M -t1:ef00 -u1:AAAAAAAA-0000-0000-0000-000000000001 \
    -n2:133120:+${ext_mib}M -t2:8300 -u2:AAAAAAAA-0000-0000-0000-000000000002 "$1" >/dev/null
  dd if="$2" of="$1" bs=1M seek=1 conv=notrunc,sparse status=none
  dd if="$3" of="$1" bs=1M seek=65 conv=notrunc,sparse status=none
}

mkext4() { # IMG DIR
  mke2fs -q -F -t ext4 -L root -U 01234567-89ab-cdef-0123-456789abcdef -E root_owner=0:0,hash_seed=01234567-89ab-cdef-0123-456789abcdef \
    -d "$2" "$1" "${ext_mib}M"
}

make_tree "$work/a" vm-a
make_fat "$work/p1.fat"
mkext4 "$work/a.ext4" "$work/a"
assemble "$out/base.img" "$work/p1.fat" "$work/a.ext4"

# second VM: most of the tree, minus a part, plus its own files
make_tree "$work/b" vm-b
rm -rf "$work/b/usr/lib/python3/email" "$work/b/usr/lib/python3/asyncio"
rnd "$work/b/var/app.bin" $((3 << 20)) 2
mkext4 "$work/b.ext4" "$work/b"
assemble "$out/second.img" "$work/p1.fat" "$work/b.ext4"

# the next day: changes written into the same filesystem
cp --sparse=always "$work/a.ext4" "$work/c.ext4"
rnd "$work/new1" $((1 << 20)) 3
rnd "$work/new2" 200000 4
seq 1 50000 | sed 's/^/day two /' > "$work/log2"
debugfs -w "$work/c.ext4" >/dev/null 2>&1 <<CMDS
write $work/new1 /home/user/download.bin
write $work/new2 /var/cache.bin
rm /var/log/messages
write $work/log2 /var/log/messages
rm /usr/lib/python3/json/decoder.py
CMDS
assemble "$out/nextday.img" "$work/p1.fat" "$work/c.ext4"
ls -ls "$out"/*.img
