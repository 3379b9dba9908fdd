//! `holdfast init`, `restore`, `verify`, `gc`, `stats`, `catalog rebuild`.

use super::Cmdline;
use crate::chunk::ChunkerParams;
use crate::ops::{parse_size, InitRequest, RestoreRequest, S3Init, VerifyRequest};
use crate::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct InitArgs {
    /// Segment size in bytes; chunks never cross a segment edge
    #[arg(long, default_value_t = 4 << 20)]
    segment_size: u32,
    /// Smallest chunk in bytes
    #[arg(long, default_value_t = 16 << 10)]
    chunk_min: u32,
    /// Average chunk in bytes
    #[arg(long, default_value_t = 64 << 10)]
    chunk_avg: u32,
    /// Largest chunk in bytes
    #[arg(long, default_value_t = 256 << 10)]
    chunk_max: u32,
    /// zstd level (1 is fastest; 3 compresses a little better)
    #[arg(long, default_value_t = 1)]
    compression_level: i32,
    /// Keep the store in an S3 bucket (AWS, MinIO, Ceph RGW, Garage, ...): s3://BUCKET/PREFIX.
    /// Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
    /// AWS_PROFILE, ...). The repository directory then holds only the catalog, locks and a read cache.
    #[arg(long, value_name = "URL")]
    s3: Option<String>,
    /// S3 endpoint for servers other than AWS, e.g. http://127.0.0.1:9000
    #[arg(long, value_name = "URL", requires = "s3")]
    endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1)
    #[arg(long, requires = "s3")]
    region: Option<String>,
    /// Address the bucket in the path (http://host/bucket/key), as most self-hosted servers need
    #[arg(long, requires = "s3")]
    path_style: bool,
    /// Local read-cache size for an S3 store, e.g. 512M, 4G (0 turns it off)
    #[arg(long, value_name = "SIZE", requires = "s3", default_value = "2G")]
    cache_size: String,
    /// Attach to a repository that already exists in the bucket (a new appliance, or after
    /// losing this machine): the catalog is rebuilt from the bucket alone
    #[arg(long, requires = "s3")]
    existing: bool,
    /// Attaching (--existing) to a store encrypted with a key file: the copy `holdfast key
    /// export` printed (mode 0600); it is checked against the bucket and kept as REPO/keyfile
    #[arg(long, value_name = "FILE", requires = "existing")]
    key_file: Option<PathBuf>,
    /// How the store is encrypted: `repokey` (the key in the store, wrapped by a passphrase:
    /// HOLDFAST_PASSPHRASE, --passphrase-file or a terminal), `keyfile` (the key in
    /// REPO/keyfile on this appliance, mode 0600: keep `holdfast key export`'s copy safe) or
    /// `none` (whoever reads the store reads every disk). Required: there is no default
    /// (`--existing` takes the bucket's)
    #[arg(long, value_name = "repokey|keyfile|none")]
    encryption: Option<String>,
}

pub fn init(cx: &Cmdline, a: InitArgs) -> Result<i32> {
    let s3 = match a.s3 {
        Some(url) => Some(S3Init {
            url,
            endpoint: a.endpoint,
            region: a.region,
            path_style: a.path_style,
            cache_bytes: parse_size(&a.cache_size)?,
            existing: a.existing,
            key_file: a.key_file,
        }),
        None => None,
    };
    use crate::repo::keys::Choice;
    let encryption =
        match (a.encryption.as_deref(), &s3) {
            (Some(e), _) => Choice::parse(e).ok_or_else(|| {
                crate::Error::usage(format!(
                    "--encryption {e:?}: choose repokey, keyfile or none"
                ))
            })?,
            // Attaching: the bucket's config says how it is encrypted.
            (None, Some(s)) if s.existing => Choice::None,
            (None, _) => return Err(crate::Error::usage(
                "choose how the store is encrypted: --encryption repokey (the key in the store, \
                 under a passphrase), keyfile (the key in REPO/keyfile on this appliance) or \
                 none (whoever can read the store reads every disk)",
            )),
        };
    let clear = encryption == Choice::None && !s3.as_ref().is_some_and(|s| s.existing);
    let req = InitRequest {
        encryption,
        chunker: ChunkerParams {
            segment_size: a.segment_size,
            min_size: a.chunk_min,
            avg_size: a.chunk_avg,
            max_size: a.chunk_max,
        },
        compression_level: a.compression_level,
        s3,
    };
    cx.out.init(&cx.app.init(&req)?);
    if clear {
        note!(
            "holdfast: the store is not encrypted: whoever can read it reads every disk backed \
             up to it (--encryption repokey or keyfile encrypts it)"
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct RestoreArgs {
    /// VM or VM@ID (default: the newest backup)
    spec: String,
    /// Disk name (may be left out when the backup has one disk)
    #[arg(long)]
    disk: Option<String>,
    /// Where to write the image: a new file, a block device, or an NBD export
    /// (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT) of a raw or qcow2 image
    #[arg(
        long,
        required_unless_present = "in_place",
        conflicts_with = "in_place"
    )]
    to: Option<PathBuf>,
    /// Overwrite the declared VM's own disks with the backup (the VM shut down first)
    #[arg(long)]
    in_place: bool,
    /// Overwrite an existing file
    #[arg(long)]
    force: bool,
    /// The image format of a new file: raw (sparse) or qcow2 ("a new VM from this backup")
    #[arg(long, value_name = "raw|qcow2")]
    format: Option<String>,
}

pub fn restore(cx: &Cmdline, a: RestoreArgs) -> Result<i32> {
    let req = RestoreRequest {
        spec: a.spec,
        disk: a.disk,
        to: a.to.unwrap_or_default(),
        force: a.force,
        format: a.format,
        in_place: a.in_place,
    };
    cx.out.restore(&cx.app.restore(&req, &cx.term())?);
    Ok(0)
}

#[derive(Args)]
pub struct VerifyArgs {
    /// VM or VM@ID (default: every backup)
    spec: Option<String>,
    /// Check only this percentage of the chunks (a stable sample)
    #[arg(long, default_value_t = 100.0)]
    sample: f64,
    /// Write the catalog's good copy back over a damaged or missing manifest in the store
    #[arg(long)]
    repair: bool,
}

pub fn verify(cx: &Cmdline, a: VerifyArgs) -> Result<i32> {
    let req = VerifyRequest {
        spec: a.spec,
        sample: a.sample,
        repair: a.repair,
    };
    let r = cx.app.verify(&req, &cx.term())?;
    cx.out.verify(&r);
    Ok(if r.is_clean() { 0 } else { 3 })
}

pub fn gc(cx: &Cmdline, accept_missing: bool) -> Result<i32> {
    cx.out.gc(&cx.app.gc(accept_missing, &cx.term())?);
    Ok(0)
}

pub fn stats(cx: &Cmdline, price: f64) -> Result<i32> {
    cx.out.stats(&cx.app.stats(price)?);
    Ok(0)
}

pub fn rebuild(cx: &Cmdline) -> Result<i32> {
    let r = cx.app.catalog_rebuild(&cx.term())?;
    cx.out.rebuild(&r);
    // What could not be imported is damage the operator must hear of: exit 3.
    Ok(if r.damaged.is_empty() { 0 } else { 3 })
}
