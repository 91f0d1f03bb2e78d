//! `mimi-relay keygen`: a certificate and key per provider domain, for local setups:
//! self-signed, or issued by a local CA made for the occasion (`--ca NAME`) to try `ca` trust.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use mimi_wire::uri::ProviderDomain;

/// Writes `{domain}.crt` and `{domain}.key` into `out` for each domain; returns the paths.
/// With `ca`, the certificates are issued by a new local CA whose certificate is written to
/// `{ca}.crt` (what peers configure as `ca`); its key is not kept.
pub fn keygen(
    domains: &[String],
    out: &Path,
    force: bool,
    ca: Option<&str>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    let ca = match ca {
        None => None,
        Some(name) => {
            let crt = out.join(format!("{name}.crt"));
            if !force && crt.exists() {
                bail!(
                    "{} already exists (use --force to replace it)",
                    crt.display()
                );
            }
            let ca = relay_tls::LocalCa::generate(name)
                .with_context(|| format!("generating the CA {name}"))?;
            std::fs::write(&crt, &ca.cert_pem)
                .with_context(|| format!("writing {}", crt.display()))?;
            written.push(crt);
            Some(ca)
        }
    };
    for d in domains {
        let domain: ProviderDomain = d
            .parse()
            .with_context(|| format!("{d:?} is not a provider domain"))?;
        let crt = out.join(format!("{domain}.crt"));
        let key = out.join(format!("{domain}.key"));
        if !force && (crt.exists() || key.exists()) {
            bail!(
                "{} already exists (use --force to replace it)",
                crt.display()
            );
        }
        let g = match &ca {
            Some(ca) => ca.issue(&domain)?,
            None => relay_tls::generate(&domain)?,
        };
        std::fs::write(&crt, g.cert_pem).with_context(|| format!("writing {}", crt.display()))?;
        write_private(&key, g.key_pem.as_bytes())?;
        written.push(crt);
        written.push(key);
    }
    Ok(written)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}
