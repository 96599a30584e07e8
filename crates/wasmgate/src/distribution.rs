//! `wasmgate plugin pull`, `push` and `cache`: module distribution from the command line, through
//! the same fetcher and cache the gateway uses.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use wasmgate_fetch::docker_config::Credentials;
use wasmgate_fetch::oci::{ImageVariant, LayoutImage, Registry};
use wasmgate_fetch::{
    Cache, DockerConfig, FetchOptions, Fetched, Fetcher, ModuleRequest, ModuleUrl, PullPolicy,
};

/// Where to reach registries and keep modules.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// A registry (host or host:port) to reach over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// An extra CA certificate (PEM) to trust; repeatable.
    #[arg(long = "ca-file", value_name = "PEM")]
    ca_files: Vec<PathBuf>,
    /// Registry credentials: a dockerconfigjson file (default: ~/.docker/config.json if present).
    #[arg(long = "docker-config", value_name = "FILE")]
    docker_config: Option<PathBuf>,
    /// The module cache (default: $WASMGATE_CACHE_DIR, else ~/.cache/wasmgate).
    #[arg(long = "cache-dir", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// file://, http(s)://, oci:// or a registry/repo:tag reference.
    url: String,
    /// The expected sha256 (of the module; of the manifest for OCI, as Istio).
    #[arg(long)]
    sha256: Option<String>,
    /// Ask the server even when the cache has the module.
    #[arg(long)]
    always: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Variant {
    /// One tar+gzip layer holding plugin.wasm (Istio's "compat"; what buildah makes).
    Compat,
    /// Solo's Wasm artifact: the raw module as its own layer.
    Artifact,
    /// A Docker image manifest with one layer holding plugin.wasm (what docker build makes).
    Docker,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// The module (.wasm) to push, or an OCI image layout folder (as `plugin build --oci` writes)
    /// whose image is pushed as it is.
    file: PathBuf,
    /// Where: oci://REGISTRY/REPO:TAG (or without oci://).
    reference: String,
    /// How to package a .wasm file [default: compat]. An image layout is already packaged.
    #[arg(long, value_enum)]
    variant: Option<Variant>,
    /// User name for the registry (the password comes from WASMGATE_REGISTRY_PASSWORD).
    #[arg(long)]
    username: Option<String>,
    #[command(flatten)]
    remote: RemoteArgs,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List cached modules.
    Ls {
        #[arg(long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Remove modules (and their compiled artefacts) unused for a while, or all of them.
    Prune {
        /// Remove those unused for longer than this (e.g. 24h, 30m); default: all.
        #[arg(long = "unused-for", value_name = "DURATION")]
        unused_for: Option<String>,
        #[arg(long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

fn cache_root(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| crate::gateway::cache_root(&wasmgate_config::GatewayConfig::default()))
}

impl RemoteArgs {
    fn options(&self) -> anyhow::Result<FetchOptions> {
        let mut options = FetchOptions {
            insecure_registries: self.insecure_registries.clone(),
            ..FetchOptions::default()
        };
        for ca in &self.ca_files {
            options
                .extra_root_certificates
                .push(std::fs::read(ca).with_context(|| format!("--ca-file {}", ca.display()))?);
        }
        Ok(options)
    }

    fn docker_config(&self) -> anyhow::Result<Option<DockerConfig>> {
        match &self.docker_config {
            Some(path) => Ok(Some(
                DockerConfig::from_file(path)
                    .map_err(|e| anyhow::anyhow!("--docker-config: {e}"))?,
            )),
            None => Ok(None),
        }
    }
}

fn io() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Fetches `url` into the cache with the fetcher the gateway uses (pull secrets, insecure
/// registries, extra CAs, a progress bar on a terminal): what `plugin pull` and `plugin inspect URL`
/// share.
pub(crate) fn fetch(
    url: &str,
    sha256: Option<&str>,
    always: bool,
    remote: &RemoteArgs,
) -> anyhow::Result<Fetched> {
    let cache = Arc::new(
        Cache::open(cache_root(remote.cache_dir.clone())).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let mut options = remote.options()?;
    let credentials = remote.docker_config()?;
    let io = io()?;
    // Last before the fetch: an early return must not leave the progress thread drawing.
    let progress = Progress::start(&wasmgate_fetch::redact_credentials(url));
    options.progress = progress.callback();
    let fetcher = match Fetcher::new(options, cache) {
        Ok(fetcher) => fetcher,
        Err(e) => {
            progress.finish();
            return Err(anyhow::anyhow!("{e}"));
        }
    };
    let request = ModuleRequest {
        url,
        sha256,
        pull_policy: always.then_some(PullPolicy::Always),
        credentials: credentials.as_ref(),
    };
    let result = io.block_on(fetcher.fetch(request));
    progress.finish();
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

pub fn pull(args: PullArgs) -> anyhow::Result<ExitCode> {
    let fetched = fetch(&args.url, args.sha256.as_deref(), args.always, &args.remote)?;
    println!("{}", fetched.path.display());
    println!("sha256 {}", fetched.sha256);
    if let Some(digest) = &fetched.digest {
        println!("digest {digest}");
    }
    println!(
        "{} bytes{}",
        fetched.bytes.len(),
        if fetched.cache_hit {
            " (from the cache)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

pub fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let ModuleUrl::Oci(reference) =
        ModuleUrl::parse(&args.reference).map_err(|e| anyhow::anyhow!("{e}"))?
    else {
        bail!(
            "{}: push needs an OCI reference (oci://REGISTRY/REPO:TAG)",
            args.reference
        );
    };
    enum Content {
        Module(Vec<u8>, ImageVariant),
        Layout(LayoutImage),
    }
    // Read before any network: a bad file fails fast, whatever the registry's state.
    let content = if args.file.is_dir() {
        if args.variant.is_some() {
            bail!(
                "{} is an image layout, pushed as it is: --variant only packages a .wasm file",
                args.file.display()
            );
        }
        let image = LayoutImage::read(&args.file, reference.tag.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Content::Layout(image)
    } else {
        let module = std::fs::read(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
        if !wasmgate_fetch::unbox::is_wasm(&module) {
            bail!(
                "{}: {}",
                args.file.display(),
                wasmgate_fetch::unbox::describe_non_wasm(&module)
            );
        }
        let variant = match args.variant.unwrap_or(Variant::Compat) {
            Variant::Compat => ImageVariant::Compat,
            Variant::Artifact => ImageVariant::Artifact,
            Variant::Docker => ImageVariant::Docker,
        };
        Content::Module(module, variant)
    };
    let credentials = match &args.username {
        Some(username) => Some(Credentials::Basic {
            username: username.clone(),
            password: std::env::var("WASMGATE_REGISTRY_PASSWORD").context(
                "--username needs the password in the WASMGATE_REGISTRY_PASSWORD environment variable",
            )?,
        }),
        None => {
            let config = match args.remote.docker_config()? {
                Some(config) => Some(config),
                None => DockerConfig::from_user_config(),
            };
            config.and_then(|c| c.credentials_for(&reference.registry))
        }
    };
    let registry = Registry::new(&reference, &args.remote.options()?, credentials)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pushed = match &content {
        Content::Module(module, variant) => {
            io()?.block_on(registry.push(&reference, module, *variant))
        }
        Content::Layout(image) => io()?.block_on(registry.push_image(&reference, image)),
    };
    let digest = pushed.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("pushed {reference}");
    println!("digest {digest}");
    Ok(ExitCode::SUCCESS)
}

pub fn cache(command: CacheCommand) -> anyhow::Result<ExitCode> {
    match command {
        CacheCommand::Ls { cache_dir } => {
            let cache = Cache::open(cache_root(cache_dir)).map_err(|e| anyhow::anyhow!("{e}"))?;
            let entries = cache.entries();
            if entries.is_empty() {
                println!("the cache at {} is empty", cache.root().display());
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            for entry in entries {
                println!(
                    "{}  {:>10} bytes  used {} ago  {}",
                    entry.sha256,
                    entry.size,
                    ago(now.saturating_sub(entry.last_used)),
                    entry.urls.join(" ")
                );
            }
        }
        CacheCommand::Prune {
            unused_for,
            cache_dir,
        } => {
            let unused_for = match unused_for {
                Some(text) => wasmgate_config::parse_duration(&text)
                    .map_err(|e| anyhow::anyhow!("--unused-for: {e}"))?,
                None => Duration::ZERO,
            };
            let cache = Cache::open(cache_root(cache_dir)).map_err(|e| anyhow::anyhow!("{e}"))?;
            let removed = cache
                .prune(unused_for)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for entry in &removed {
                println!("removed {} ({} bytes)", entry.sha256, entry.size);
            }
            println!("{} module(s) removed", removed.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ago(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86400),
    }
}

/// A progress bar on stderr while a download runs (a spinner until the size is known), when
/// stderr is a terminal.
struct Progress {
    bytes: Arc<std::sync::atomic::AtomicU64>,
    /// The total size, plus one; 0 while unknown.
    total: Arc<std::sync::atomic::AtomicU64>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(url: &str) -> Self {
        use std::io::IsTerminal;
        use std::sync::atomic::{AtomicU64, Ordering};
        let bytes = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        if !std::io::stderr().is_terminal() {
            return Self {
                bytes,
                total,
                stop: None,
                thread: None,
            };
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let url = url.to_owned();
        let (seen, size) = (bytes.clone(), total.clone());
        let thread = std::thread::spawn(move || {
            let frames = ['|', '/', '-', '\\'];
            let mut frame = 0;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(120))
            {
                let got = seen.load(Ordering::Relaxed);
                let line = match size.load(Ordering::Relaxed) {
                    0 => format!("{} {url}  {}", frames[frame % 4], mib(got)),
                    plus_one => {
                        let total = plus_one - 1;
                        let fraction = if total == 0 {
                            1.0
                        } else {
                            got as f64 / total as f64
                        };
                        let filled = ((fraction * 30.0) as usize).min(30);
                        format!(
                            "[{}{}] {:>3.0}%  {} / {}  {url}",
                            "#".repeat(filled),
                            " ".repeat(30 - filled),
                            fraction * 100.0,
                            mib(got),
                            mib(total)
                        )
                    }
                };
                eprint!("\r\x1b[2K{line}");
                frame += 1;
            }
            eprint!("\r\x1b[2K");
        });
        Self {
            bytes,
            total,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn callback(&self) -> Option<wasmgate_fetch::ProgressFn> {
        use std::sync::atomic::Ordering;
        self.thread.as_ref()?;
        let (bytes, total) = (self.bytes.clone(), self.total.clone());
        Some(wasmgate_fetch::ProgressFn(Arc::new(move |got, size| {
            bytes.store(got, Ordering::Relaxed);
            if let Some(size) = size {
                total.store(size + 1, Ordering::Relaxed);
            }
        })))
    }

    fn finish(mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
