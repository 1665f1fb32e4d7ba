//! The commit point (one Kafka transaction per `commitInterval`), state snapshots handed to
//! the uploader, and garbage collection once a newer part is named by committed metadata.

use super::*;

impl Worker {
    pub(super) fn commit(&mut self) -> Result<()> {
        let started = Instant::now();
        // Between two commits: bring the hot tiers back within the budget they share.
        let budget = self.state_budget();
        self.user
            .set_budget(share_budget(budget, self.item.hot_bytes()));
        self.user.maintain()?;
        self.item
            .set_budget(share_budget(budget, self.user.hot_bytes()));
        self.item.maintain()?;
        self.send_marker_if_changed();
        let sender = Sender {
            gen: self.opts.generation,
            index: self.opts.index,
            senders: self.opts.workers,
        };
        let exchange = self.topics.exchange.clone();
        for (kg, entries) in self.sender.take_frames() {
            for value in wire::encode_frames(sender, &entries, MAX_RECORD_BYTES) {
                self.produce(
                    BaseRecord::to(&exchange)
                        .partition(kg as i32)
                        .payload(value.as_slice()),
                )?;
            }
        }
        let kgs: Vec<u32> = self.changelog_buf.keys().copied().collect();
        for kg in kgs {
            self.flush_changelog(kg)?;
        }
        if let Some(c) = self.contribution.take() {
            let value = serde_json::to_vec(&c)?;
            let trending = self.topics.trending.clone();
            self.produce(
                BaseRecord::to(&trending)
                    .partition(0)
                    .payload(value.as_slice()),
            )?;
        }
        let produced = started.elapsed();
        let offsets = self.offsets()?;
        let cgm = self
            .consumer
            .group_metadata()
            .ok_or_else(|| Error::Kafka("consumer has no group metadata".into()))?;
        self.finish_transaction(|p| p.send_offsets_to_transaction(&offsets, &cgm, CALL_TIMEOUT))?;
        let offsets_sent = started.elapsed();
        self.await_deliveries()?;
        let delivered = started.elapsed();
        self.finish_transaction(|p| p.commit_transaction(CALL_TIMEOUT))?;
        // Where a commit's time goes: the worker's own work, the offsets call, waiting for
        // the broker to acknowledge the transaction's records, the commit call.
        tracing::debug!(
            produced_ms = produced.as_secs_f64() * 1e3,
            offsets_ms = (offsets_sent - produced).as_secs_f64() * 1e3,
            delivered_ms = (delivered - offsets_sent).as_secs_f64() * 1e3,
            committed_ms = (started.elapsed() - delivered).as_secs_f64() * 1e3,
            "commit"
        );
        {
            let mut d = self.deliveries.lock().expect("deliveries lock");
            for (p, next) in d.changelog_next.drain() {
                self.changelog_next.insert(p as u32, next);
            }
        }
        kafka::retry("begin_transaction", || self.producer.begin_transaction())?;
        self.dirty = false;
        let m = &self.metrics;
        m.commits_completed.fetch_add(1, Relaxed);
        m.commit_duration_ms
            .store(started.elapsed().as_millis() as u64, Relaxed);
        m.watermark.store(self.receiver.watermark(), Relaxed);
        if let Some(t) = self.tracker.max_event_time() {
            m.max_event_time.store(t, Relaxed);
        }
        if self.gc_after_commit {
            self.gc_after_commit = false;
            self.collect_garbage()?;
        }
        Ok(())
    }

    /// Wait until every record of the transaction is acknowledged. `commit_transaction` would
    /// do it too, but rust-rdkafka's flush polls in 100 ms steps that the producer's own
    /// polling thread starves, which cost every commit 100 ms.
    pub(super) fn await_deliveries(&self) -> Result<()> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() > deadline {
                // Let commit_transaction wait and report what it finds.
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Some(f) = self
            .deliveries
            .lock()
            .expect("deliveries lock")
            .failed
            .take()
        {
            return Err(Error::Rewind(f));
        }
        Ok(())
    }

    /// Produce a key group's pending history appends as one changelog record.
    pub(super) fn flush_changelog(&mut self, kg: u32) -> Result<()> {
        let Some((n, buf)) = self.changelog_buf.remove(&kg) else {
            return Ok(());
        };
        let mut value = Vec::with_capacity(buf.len() + 5);
        value.push(changelog::MAGIC);
        put_u32(&mut value, n);
        value.extend_from_slice(&buf);
        let changelog = self.topics.changelog.clone();
        self.produce(
            BaseRecord::to(&changelog)
                .partition(kg as i32)
                .payload(value.as_slice()),
        )
    }

    /// Run a transactional call, retrying what is retriable; an abortable failure aborts the
    /// transaction and rewinds the worker to the last committed state.
    pub(super) fn finish_transaction(
        &self,
        f: impl Fn(&TxnProducer) -> rdkafka::error::KafkaResult<()>,
    ) -> Result<()> {
        let deadline = Instant::now()
            + self
                .cfg
                .kafka
                .as_ref()
                .expect("validated")
                .transaction_timeout
                .as_std();
        let mut pause = Duration::from_millis(50);
        loop {
            match f(&self.producer) {
                Ok(()) => return Ok(()),
                Err(e) => match kafka::classify(&e) {
                    kafka::Failure::Retriable(m) if Instant::now() < deadline => {
                        tracing::warn!(error = %m, "transaction call failed; retrying");
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                    kafka::Failure::Retriable(m) | kafka::Failure::Abortable(m) => {
                        let _ = kafka::retry("abort_transaction", || {
                            self.producer.abort_transaction(CALL_TIMEOUT)
                        });
                        return Err(Error::Rewind(m));
                    }
                    kafka::Failure::Fatal(m) => return Err(Error::Kafka(m)),
                },
            }
        }
    }

    /// The offsets (and metadata) of every owned input and exchange partition.
    pub(super) fn offsets(&self) -> Result<TopicPartitionList> {
        let mut tpl = TopicPartitionList::new();
        for (i, inp) in self.inputs.iter().enumerate() {
            let p = &self.tracker.partitions()[i];
            let meta = InputMeta {
                max_ts: p.max_ts,
                idle: p.idle,
            };
            tpl.add_partition_offset(&inp.name, inp.partition, Offset::Offset(inp.next))
                .map_err(|e| kafka::kafka_error("offsets", e))?;
            tpl.find_partition(&inp.name, inp.partition)
                .expect("just added")
                .set_metadata(meta.encode());
        }
        let item_wm = self.receiver.watermark();
        for (kg, next) in &self.exchange_next {
            let inbox = &self.receiver.inboxes()[kg];
            let meta = ExchangeMeta {
                gen: self.opts.generation,
                workers: self.opts.workers,
                item_wm,
                user_floor: self.user_wm,
                table: inbox.table.clone(),
                state: self.state_refs[kg].clone(),
            };
            tpl.add_partition_offset(&self.topics.exchange, *kg as i32, Offset::Offset(*next))
                .map_err(|e| kafka::kafka_error("offsets", e))?;
            tpl.find_partition(&self.topics.exchange, *kg as i32)
                .expect("just added")
                .set_metadata(meta.encode()?);
        }
        Ok(tpl)
    }

    // ------------------------------------------------------------------ snapshots

    pub(super) fn maybe_checkpoint(&mut self) -> Result<()> {
        if self.savepoint.is_none()
            && !self.uploader().busy()
            && self.last_checkpoint.elapsed() >= self.cfg.checkpoint_interval.as_std()
        {
            self.snapshot(None)?;
        }
        Ok(())
    }

    /// Cut a part at this commit boundary and hand it to the uploader.
    pub(super) fn snapshot(&mut self, savepoint: Option<String>) -> Result<()> {
        let started = Instant::now();
        let mut out = self.state().checkpoint_writer();
        self.user.expire(self.user_wm);
        self.user.snapshot(&mut out)?;
        self.item.snapshot(self.range.clone(), &mut out)?;
        for (kg, inbox) in self.receiver.inboxes() {
            out.push(StateOp::Put(
                codec::state_key(*kg, INBOXES, &[]),
                inbox.encode(),
            ))?;
        }
        out.finish()?;
        let written_ms = started.elapsed().as_millis() as u64;
        self.part_seq += 1;
        let name = format!("part-{}", self.part_seq);
        let local = self.state().cut(&name)?;
        // What the worker's loop waited for (write-back, then the RocksDB cut); the upload
        // runs on the uploader thread.
        tracing::info!(
            seq = self.part_seq,
            pause_ms = started.elapsed().as_millis() as u64,
            written_ms,
            "checkpoint part cut"
        );
        let groups = self
            .range
            .clone()
            .map(|kg| {
                (
                    kg,
                    GroupPosition {
                        changelog_offset: self.changelog_next[&kg],
                        exchange_offset: self.exchange_next[&kg],
                    },
                )
            })
            .collect();
        let inputs = self
            .inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| InputPosition {
                topic: inp.name.clone(),
                partition: inp.partition,
                offset: inp.next,
                meta: InputMeta {
                    max_ts: self.tracker.partitions()[i].max_ts,
                    idle: self.tracker.partitions()[i].idle,
                },
            })
            .collect();
        let manifest = PartManifest {
            job: self.cfg.name.clone(),
            gen: self.opts.generation,
            worker: self.opts.index,
            workers: self.opts.workers,
            seq: self.part_seq,
            key_groups: self.cfg.key_groups,
            kg_start: self.range.start,
            kg_end: self.range.end,
            created_at_ms: now_ms(),
            self_contained: false,
            savepoint: savepoint.clone(),
            files: Vec::new(),
            groups,
            inputs,
            item_wm: self.receiver.watermark(),
            user_wm: self.user_wm,
            events_in: self.metrics.events_in.load(Relaxed),
            state_format: crate::state::records::STATE_FORMAT,
        };
        self.uploader().submit(UploadJob::Part {
            local,
            manifest: Box::new(manifest),
            savepoint,
        });
        self.metrics.upload_in_progress.store(true, Relaxed);
        self.last_checkpoint = Instant::now();
        self.metrics.users.store(self.user.users() as u64, Relaxed);
        self.metrics
            .pane_entries
            .store(self.item.pane_entries() as u64, Relaxed);
        Ok(())
    }

    pub(super) fn serve_uploads(&mut self) -> Result<()> {
        while let Ok(done) = self.uploader().done.try_recv() {
            match done {
                UploadDone::Part {
                    url,
                    manifest,
                    stats,
                    savepoint_part,
                } => {
                    for (kg, g) in &manifest.groups {
                        self.state_refs.insert(
                            *kg,
                            StateRef {
                                part: Some(url.clone()),
                                changelog_offset: g.changelog_offset,
                                exchange_offset: g.exchange_offset,
                                table_gen: 0,
                                table_senders: 0,
                            },
                        );
                    }
                    self.dirty = true;
                    self.gc_after_commit = true;
                    let m = &self.metrics;
                    m.upload_in_progress.store(false, Relaxed);
                    m.checkpoints_completed.fetch_add(1, Relaxed);
                    m.checkpoint_last_id.store(manifest.seq, Relaxed);
                    m.checkpoint_duration_ms.store(stats.duration_ms, Relaxed);
                    m.checkpoint_uploaded_bytes
                        .store(stats.uploaded_bytes, Relaxed);
                    m.checkpoint_size_bytes.store(stats.total_bytes, Relaxed);
                    tracing::info!(part = %url, uploaded_bytes = stats.uploaded_bytes, size_bytes = stats.total_bytes, duration_ms = stats.duration_ms, "checkpoint part uploaded");
                    if let Some((id, sp)) = savepoint_part {
                        self.finish_savepoint(&id, sp)?;
                    }
                }
                UploadDone::Gc(r) => match r {
                    Ok(s) => tracing::debug!(parts = s.parts, files = s.files, "garbage collected"),
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                },
            }
        }
        Ok(())
    }

    /// After a commit that moved this worker's pointers to a new part: delete what no
    /// committed metadata needs, and truncate the internal topics below the pointers.
    pub(super) fn collect_garbage(&mut self) -> Result<()> {
        let all: Vec<(String, i32)> = (0..self.cfg.key_groups)
            .map(|kg| (self.topics.exchange.clone(), kg as i32))
            .collect();
        // Without waiting for the other workers' open transactions: a part they are about to
        // name is their newest, which collection keeps anyway.
        let committed = kafka::committed(&self.metadata_consumer, &all)?;
        let mut referenced = BTreeSet::new();
        let mut max_workers = self.opts.workers;
        for (_, meta) in committed.values() {
            if let Ok(m) = ExchangeMeta::decode(meta) {
                max_workers = max_workers.max(m.workers);
                if let Some(dir) = m
                    .state
                    .part
                    .as_deref()
                    .and_then(|u| u.strip_prefix(&self.checkpoint_url_prefix))
                    .and_then(|k| {
                        k.trim_start_matches('/')
                            .strip_suffix(&format!("/{PART_MANIFEST}"))
                    })
                {
                    referenced.insert(dir.to_string());
                }
            }
        }
        let mut scope: BTreeSet<u32> = [self.opts.index].into();
        if self.opts.index == 0 {
            // Worker 0 also collects for indexes an earlier, larger generation used.
            scope.extend(self.opts.workers..max_workers.max(self.opts.workers).saturating_add(64));
        }
        self.uploader().submit(UploadJob::Gc {
            scope,
            current: (0..self.opts.workers).collect(),
            referenced,
        });
        let mut tpl = TopicPartitionList::new();
        for (kg, r) in &self.state_refs {
            if r.part.is_some() {
                tpl.add_partition_offset(
                    &self.topics.changelog,
                    *kg as i32,
                    Offset::Offset(r.changelog_offset),
                )
                .map_err(|e| kafka::kafka_error("truncate", e))?;
                tpl.add_partition_offset(
                    &self.topics.exchange,
                    *kg as i32,
                    Offset::Offset(r.exchange_offset),
                )
                .map_err(|e| kafka::kafka_error("truncate", e))?;
            }
        }
        if tpl.count() > 0 {
            self.admin.delete_records(&tpl)?;
        }
        Ok(())
    }
}
