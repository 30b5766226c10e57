//! Making a volume's SR known to xapi for the length of an operation, and undoing it.
//!
//! xapi forgets idle SRs (one SR per volume, as the old driver did), so every operation
//! introduces the SR, plugs a PBD, works, then unplugs and forgets. Unlike the old driver this
//! looks the SR up first (Nova may have it attached to a guest), and every failure path undoes
//! exactly what was done.

use std::collections::BTreeMap;

use tracing::{debug, warn};
use uuid::Uuid;

use crate::journal::Effect;
use crate::xenapi::{Host, Pbd, PbdRecord, Ref, Sr, SrRecord, SrSpec, XenApiClient};

use super::{VolumeError, record};

/// An SR this operation has made usable, and what was done to get there.
#[derive(Debug)]
pub struct SrHandle {
    pub sr: Ref<Sr>,
    pub uuid: Uuid,
    /// We introduced the SR, so we forget it afterwards.
    introduced: bool,
    /// PBDs we created (destroyed afterwards unless SR.forget takes them along).
    created: Vec<Ref<Pbd>>,
    /// PBDs we plugged (unplugged afterwards).
    plugged: Vec<Ref<Pbd>>,
}

/// The NFS device configuration of every SR on the share.
pub fn device_config(server: &str, serverpath: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("server".to_string(), server.to_string()),
        ("serverpath".to_string(), serverpath.to_string()),
    ])
}

pub fn spec<'a>(name: &'a str, description: &'a str) -> SrSpec<'a> {
    SrSpec {
        name_label: name,
        name_description: description,
        sr_type: "nfs",
        content_type: "user",
        shared: false,
    }
}

/// Runs best-effort clean-up steps, collecting what failed instead of stopping.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub failures: Vec<String>,
}

impl Cleanup {
    pub fn note<T>(&mut self, what: &str, result: Result<T, impl std::fmt::Display>) {
        if let Err(e) = result {
            warn!(step = what, error = %e, "clean-up step failed");
            self.failures.push(format!("{what}: {e}"));
            super::mark_unclean();
        }
    }
}

impl SrHandle {
    /// Wraps an SR created by `SR.create` (which also made and plugged its PBDs).
    pub fn created(sr: Ref<Sr>, record: &SrRecord) -> Result<Self, VolumeError> {
        let uuid = Uuid::parse_str(&record.uuid)
            .map_err(|_| VolumeError::Invalid(format!("xapi gave SR uuid {:?}", record.uuid)))?;
        Ok(SrHandle {
            sr,
            uuid,
            introduced: true,
            created: Vec::new(),
            plugged: record.pbds.clone(),
        })
    }

    /// Makes SR `uuid` usable on `host`: reuses it if xapi knows it (plugging a PBD if none is),
    /// otherwise introduces it and plugs a new PBD. On failure, undoes its own steps.
    pub async fn attach(
        xenapi: &XenApiClient,
        host: &Ref<Host>,
        uuid: Uuid,
        device_config: &BTreeMap<String, String>,
        name: &str,
        description: &str,
    ) -> Result<Self, VolumeError> {
        let context = format!("attaching SR {uuid}");
        match xenapi.get_by_uuid::<Sr>(&uuid.to_string()).await {
            Ok(sr) => Self::reuse(xenapi, host, sr, uuid, device_config).await,
            Err(e) if e.is("UUID_INVALID") => {
                record(Effect::SrIntroduced { sr: uuid })?;
                let sr = xenapi
                    .sr_introduce(&uuid.to_string(), &spec(name, description))
                    .await
                    .map_err(VolumeError::xenapi(context.clone()))?;
                let mut handle = SrHandle {
                    sr,
                    uuid,
                    introduced: true,
                    created: Vec::new(),
                    plugged: Vec::new(),
                };
                if let Err(e) = handle.add_pbd(xenapi, host, device_config).await {
                    let mut cleanup = Cleanup::default();
                    handle.release(xenapi, &mut cleanup).await;
                    return Err(e.with_cleanup(cleanup.failures));
                }
                Ok(handle)
            }
            Err(e) => Err(VolumeError::xenapi(context)(e)),
        }
    }

    async fn reuse(
        xenapi: &XenApiClient,
        host: &Ref<Host>,
        sr: Ref<Sr>,
        uuid: Uuid,
        device_config: &BTreeMap<String, String>,
    ) -> Result<Self, VolumeError> {
        debug!(sr = %uuid, "SR already known to xapi; using it as it is");
        let sr_record: SrRecord = xenapi
            .get_record(&sr)
            .await
            .map_err(VolumeError::xenapi(format!("reading SR {uuid}")))?;
        let mut handle = SrHandle {
            sr,
            uuid,
            introduced: false,
            created: Vec::new(),
            plugged: Vec::new(),
        };
        for pbd in &sr_record.pbds {
            let pbd_record: PbdRecord = xenapi
                .get_record(pbd)
                .await
                .map_err(VolumeError::xenapi(format!("reading a PBD of SR {uuid}")))?;
            if pbd_record.host == *host {
                if pbd_record.currently_attached {
                    return Ok(handle);
                }
                record(Effect::PbdPlugged {
                    sr: uuid,
                    pbd: pbd.to_string(),
                })?;
                let plugged = xenapi.pbd_plug(pbd).await;
                plugged.map_err(VolumeError::xenapi(format!("plugging SR {uuid}")))?;
                handle.plugged.push(pbd.clone());
                return Ok(handle);
            }
        }
        if let Err(e) = handle.add_pbd(xenapi, host, device_config).await {
            let mut cleanup = Cleanup::default();
            handle.release(xenapi, &mut cleanup).await;
            return Err(e.with_cleanup(cleanup.failures));
        }
        Ok(handle)
    }

    async fn add_pbd(
        &mut self,
        xenapi: &XenApiClient,
        host: &Ref<Host>,
        device_config: &BTreeMap<String, String>,
    ) -> Result<(), VolumeError> {
        let context = format!("attaching SR {}", self.uuid);
        let pbd = xenapi
            .pbd_create(host, &self.sr, device_config)
            .await
            .map_err(VolumeError::xenapi(context.clone()))?;
        self.created.push(pbd.clone());
        // Recorded once xapi has named it; a crash in between leaves a PBD that is unplugged
        // and so harmless, or goes with the SR when an introduced SR is forgotten.
        record(Effect::PbdCreated {
            sr: self.uuid,
            pbd: pbd.to_string(),
        })?;
        xenapi
            .pbd_plug(&pbd)
            .await
            .map_err(VolumeError::xenapi(context))?;
        self.plugged.push(pbd);
        Ok(())
    }

    async fn unplug(&self, xenapi: &XenApiClient, cleanup: &mut Cleanup) {
        for pbd in &self.plugged {
            match xenapi.pbd_unplug(pbd).await {
                Err(e) if e.is("HANDLE_INVALID") => {}
                result => cleanup.note(&format!("PBD.unplug on SR {}", self.uuid), result),
            }
        }
    }

    /// Puts xapi back as it was before [`SrHandle::attach`]: unplugs what was plugged, and
    /// forgets the SR if it was introduced (which removes its PBDs too).
    pub async fn release(self, xenapi: &XenApiClient, cleanup: &mut Cleanup) {
        self.unplug(xenapi, cleanup).await;
        if self.introduced {
            cleanup.note(
                &format!("SR.forget of SR {}", self.uuid),
                xenapi.sr_forget(&self.sr).await,
            );
        } else {
            for pbd in &self.created {
                cleanup.note(
                    &format!("PBD.destroy on SR {}", self.uuid),
                    xenapi.pbd_destroy(pbd).await,
                );
            }
        }
    }

    /// Unplugs and destroys the SR: xapi's SM removes the SR directory from the share.
    pub async fn destroy(self, xenapi: &XenApiClient) -> Result<(), VolumeError> {
        let mut cleanup = Cleanup::default();
        self.unplug(xenapi, &mut cleanup).await;
        if !cleanup.failures.is_empty() {
            return Err(VolumeError::Conflict(format!(
                "SR {} could not be detached: {}",
                self.uuid,
                cleanup.failures.join("; ")
            )));
        }
        xenapi
            .sr_destroy(&self.sr)
            .await
            .map_err(VolumeError::xenapi(format!("destroying SR {}", self.uuid)))
    }
}
