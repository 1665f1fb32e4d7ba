//! Savepoints: the two-barrier drain across workers, the part, and the job-wide manifest.

use super::*;

impl Worker {
    pub(super) fn serve_control(&mut self) -> Result<()> {
        let Some(rx) = &self.control else {
            return Ok(());
        };
        let requests: Vec<WorkerControl> = rx.try_iter().collect();
        for WorkerControl::Savepoint { id, stop, reply } in requests {
            if self.metrics.stopped.load(Relaxed) {
                // The savepoint that stopped the job, asked for again (its caller lost the
                // answer): the same answer. Anything else finds the job stopped.
                let last = self
                    .metrics
                    .last_savepoint
                    .lock()
                    .expect("metrics lock")
                    .clone();
                let answer = match (&id, last) {
                    (Some(id), Some(location)) if location.ends_with(&format!("/{id}")) => {
                        Ok(SavepointInfo {
                            id: id.clone(),
                            location,
                            part: String::new(),
                            stop: true,
                            duration_ms: 0,
                        })
                    }
                    _ => Err("the job is stopped".into()),
                };
                let _ = reply.send(answer);
                continue;
            }
            let id = id.unwrap_or_else(|| format!("sp-{}", now_ms()));
            if let Err(e) = check_savepoint_id(&id) {
                let _ = reply.send(Err(e.to_string()));
                continue;
            }
            match &mut self.savepoint {
                Some(run) if run.id == id => {
                    run.initiator = true;
                    run.replies.push(reply);
                }
                Some(run) => {
                    let _ = reply.send(Err(format!(
                        "savepoint {} is in progress; try again when it is done",
                        run.id
                    )));
                }
                None => self.start_savepoint(id, stop, true, Some(reply))?,
            }
        }
        Ok(())
    }

    pub(super) fn input_tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for inp in &self.inputs {
            tpl.add_partition(&inp.name, inp.partition);
        }
        tpl
    }

    pub(super) fn start_savepoint(
        &mut self,
        id: String,
        stop: bool,
        initiator: bool,
        reply: Option<crossbeam_channel::Sender<std::result::Result<SavepointInfo, String>>>,
    ) -> Result<()> {
        tracing::info!(savepoint = %id, stop, initiator, "savepoint: pausing inputs");
        if !self.inputs.is_empty() {
            self.consumer
                .pause(&self.input_tpl())
                .map_err(|e| kafka::kafka_error("pause", e))?;
        }
        self.paused = true;
        self.send_marker();
        self.sender.barrier(Barrier {
            id: id.clone(),
            phase: 1,
            stop,
        });
        self.savepoint = Some(SavepointRun {
            id,
            stop,
            initiator,
            phase: 1,
            started: Instant::now(),
            replies: reply.into_iter().collect(),
        });
        self.dirty = true;
        self.commit()
    }

    pub(super) fn progress_savepoint(&mut self) -> Result<()> {
        if let Some((id, stop)) = self.join.take() {
            if self.savepoint.is_none() && !self.paused {
                self.start_savepoint(id, stop, false, None)?;
            }
        }
        let gen = self.opts.generation;
        let Some(run) = &self.savepoint else {
            return Ok(());
        };
        let (id, phase, stop) = (run.id.clone(), run.phase, run.stop);
        if run.started.elapsed() > SAVEPOINT_TIMEOUT {
            // The job resumes (even a stop request): a savepoint that cannot finish must not
            // leave the job paused. A part still uploading completes as a plain checkpoint.
            let msg = if phase < 3 {
                format!(
                    "savepoint {id}: not every worker's barrier arrived within {}s",
                    SAVEPOINT_TIMEOUT.as_secs()
                )
            } else {
                format!(
                    "savepoint {id}: this worker's part was not stored within {}s (is the \
                     object store reachable?)",
                    SAVEPOINT_TIMEOUT.as_secs()
                )
            };
            tracing::warn!(savepoint = %id, "{msg}");
            self.end_savepoint(Err(msg), false)?;
            return Ok(());
        }
        if phase == 1 && self.receiver.barrier_complete(&id, 1, gen) {
            // Every forwarded event is in: close the item hop.
            self.sender.barrier(Barrier {
                id: id.clone(),
                phase: 2,
                stop,
            });
            self.set_phase(2);
            self.dirty = true;
            self.commit()?;
        } else if phase == 2 && self.receiver.barrier_complete(&id, 2, gen) {
            // Everything sent before the barriers is applied: the state is the savepoint.
            self.advance()?;
            self.dirty = true;
            self.commit()?;
            self.set_phase(3);
            self.snapshot(Some(id))?;
        }
        Ok(())
    }

    pub(super) fn set_phase(&mut self, phase: u8) {
        if let Some(run) = &mut self.savepoint {
            run.phase = phase;
        }
    }

    pub(super) fn finish_savepoint(
        &mut self,
        id: &str,
        part: std::result::Result<String, String>,
    ) -> Result<()> {
        let Some(run) = self.savepoint.as_ref().filter(|run| run.id == id) else {
            // A savepoint that timed out (or another one): its part is a checkpoint like any
            // other, and its copy is left unreferenced.
            tracing::info!(savepoint = %id, "part of a savepoint that is no longer in progress");
            return Ok(());
        };
        let part = match part {
            Ok(p) => p,
            Err(e) => return self.end_savepoint(Err(e), false),
        };
        let dir = format!(
            "{}/{}",
            self.savepoint_store_url.trim_end_matches('/'),
            run.id
        );
        let info = SavepointInfo {
            id: run.id.clone(),
            location: dir.clone(),
            part,
            stop: run.stop,
            duration_ms: run.started.elapsed().as_millis() as u64,
        };
        let stop = run.stop;
        if run.initiator {
            // Write the job-wide manifest once every worker's part is in, off this thread.
            let manifest = SavepointManifest {
                id: run.id.clone(),
                job: self.cfg.name.clone(),
                gen: self.opts.generation,
                workers: self.opts.workers,
                key_groups: self.cfg.key_groups,
                created_at_ms: now_ms(),
                parts: (0..self.opts.workers)
                    .map(|w| format!("w{w:04}/{PART_MANIFEST}"))
                    .collect(),
                stop,
            };
            let replies = self
                .savepoint
                .as_mut()
                .map(|r| std::mem::take(&mut r.replies))
                .unwrap_or_default();
            let store_url = self.savepoint_store_url.clone();
            let s3 = self.cfg.s3.clone();
            let answer = info.clone();
            std::thread::spawn(move || {
                let r = write_savepoint_manifest(&store_url, s3.as_ref(), manifest)
                    .map(|_| answer)
                    .map_err(|e| e.to_string());
                for reply in replies {
                    let _ = reply.send(r.clone());
                }
            });
        }
        self.end_savepoint(Ok(Some(info)), stop)
    }

    /// Resume (or stay stopped) and answer whoever is still waiting.
    pub(super) fn end_savepoint(
        &mut self,
        result: std::result::Result<Option<SavepointInfo>, String>,
        stop: bool,
    ) -> Result<()> {
        let Some(run) = self.savepoint.take() else {
            return Ok(());
        };
        if let Ok(Some(info)) = &result {
            *self.metrics.last_savepoint.lock().expect("metrics lock") =
                Some(info.location.clone());
        }
        for reply in run.replies {
            let _ = reply.send(match &result {
                Ok(Some(info)) => Ok(info.clone()),
                Ok(None) => Err("savepoint finished without a result".into()),
                Err(e) => Err(e.clone()),
            });
        }
        if stop && result.is_ok() {
            tracing::info!(savepoint = %run.id, "stopped with a savepoint; inputs stay paused");
            self.metrics.stopped.store(true, Relaxed);
            return Ok(());
        }
        if !self.inputs.is_empty() {
            self.consumer
                .resume(&self.input_tpl())
                .map_err(|e| kafka::kafka_error("resume", e))?;
            let mut at = TopicPartitionList::new();
            for inp in &self.inputs {
                at.add_partition_offset(&inp.name, inp.partition, Offset::Offset(inp.next))
                    .map_err(|e| kafka::kafka_error("seek", e))?;
            }
            self.consumer
                .seek_partitions(at, CALL_TIMEOUT)
                .map_err(|e| kafka::kafka_error("seek", e))?;
        }
        self.paused = false;
        // Idle timers restart: a pause is not silence.
        for inp in &mut self.inputs {
            inp.silent_since = Instant::now();
        }
        Ok(())
    }
}

fn write_savepoint_manifest(
    store_url: &str,
    s3: Option<&crate::config::S3Config>,
    manifest: SavepointManifest,
) -> Result<()> {
    let store = objstore::open(store_url, s3)?;
    let deadline = Instant::now() + SAVEPOINT_TIMEOUT;
    for p in &manifest.parts {
        let key = format!("{}/{p}", manifest.id);
        loop {
            match store.get_bytes(&key) {
                Ok(_) => break,
                Err(e) if e.is_not_found() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(Error::Checkpoint(format!(
                        "savepoint {}: part {p} missing: {e}",
                        manifest.id
                    )))
                }
            }
        }
    }
    store.put_bytes(
        &format!("{}/{SAVEPOINT_MANIFEST}", manifest.id),
        &serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(())
}
