//! Rebuilding a worker's state at start: from the parts named by the committed metadata (or a
//! savepoint's), then the changelog and exchange logs after them.

use super::*;

impl Worker {
    pub(super) fn restore(
        &mut self,
        mode: StartMode,
        committed: &HashMap<(String, i32), (i64, String)>,
        metas: &BTreeMap<u32, ExchangeMeta>,
        savepoint: Option<(String, SavepointManifest)>,
    ) -> Result<HashMap<String, String>> {
        let gen = self.opts.generation;
        let workers = self.opts.workers;
        let kgs: Vec<u32> = self.range.clone().collect();
        let mut ends = BTreeMap::new();
        for kg in &kgs {
            let (lo, hi) = kafka::watermarks(&self.consumer, &self.topics.changelog, *kg as i32)?;
            let (xlo, _) = kafka::watermarks(&self.consumer, &self.topics.exchange, *kg as i32)?;
            ends.insert(*kg, (lo, hi, xlo));
        }
        let mut positions: HashMap<(String, i32), (i64, InputMeta)> = HashMap::new();
        for ((t, p), (o, m)) in committed {
            if *t != self.topics.exchange {
                positions.insert(
                    (t.clone(), *p),
                    (
                        *o,
                        if m.is_empty() {
                            InputMeta::default()
                        } else {
                            InputMeta::decode(m)?
                        },
                    ),
                );
            }
        }
        let mut inboxes: BTreeMap<u32, Inbox> = BTreeMap::new();
        let mut known = HashMap::new();
        let mut user_floor = WM_MIN;
        let mut item_wm = WM_MIN;
        let mut through = FastMap::default();
        match mode {
            StartMode::Fresh => {
                self.detach_stores();
                self.state = Some(StateManager::create(&self.state_dir)?);
                self.attach_stores();
                for kg in &kgs {
                    let (_, hi, xlo) = ends[kg];
                    inboxes.insert(*kg, Inbox::new(PartitionTable::new(gen, workers), WM_MIN));
                    self.exchange_next.insert(*kg, xlo);
                    self.changelog_next.insert(*kg, hi);
                    self.state_refs.insert(
                        *kg,
                        StateRef {
                            part: None,
                            changelog_offset: hi,
                            exchange_offset: xlo,
                            table_gen: gen,
                            table_senders: workers,
                        },
                    );
                }
            }
            StartMode::Committed => {
                // Parts named by the committed metadata, then the logs after them.
                let mut by_part: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
                for kg in &kgs {
                    by_part
                        .entry(metas[kg].state.part.clone())
                        .or_default()
                        .push(*kg);
                }
                let mut loaded = self.load_parts(&by_part, &mut known)?;
                for kg in &kgs {
                    let m = &metas[kg];
                    let mut inbox = loaded.remove(kg).unwrap_or_default();
                    if m.state.table_gen > inbox.table.gen {
                        // A part of the previous generation (the savepoint this one started
                        // from): a new table, and its queued entries still apply, as they did
                        // at that start.
                        let floor = inbox.floor;
                        inbox = inbox.renew(
                            PartitionTable::new(m.state.table_gen, m.state.table_senders),
                            floor,
                        );
                    }
                    inboxes.insert(*kg, inbox);
                    self.state_refs.insert(*kg, m.state.clone());
                    self.changelog_next.insert(*kg, ends[kg].1);
                }
                let resume_wm = inboxes.values().map(|i| i.floor).min().unwrap_or(WM_MIN);
                self.item.resume(resume_wm);
                self.receiver = Receiver::new(self.windowing, inboxes, resume_wm);
                inboxes = BTreeMap::new();
                self.replay_changelog(&kgs, |kg| metas[&kg].state.changelog_offset)?;
                let exchange_to: BTreeMap<u32, i64> = kgs
                    .iter()
                    .map(|kg| {
                        let c = committed
                            .get(&(self.topics.exchange.clone(), *kg as i32))
                            .map_or(metas[kg].state.exchange_offset, |(o, _)| *o);
                        (*kg, c)
                    })
                    .collect();
                self.replay_exchange(&kgs, |kg| metas[&kg].state.exchange_offset, &exchange_to)?;
                for kg in &kgs {
                    self.exchange_next.insert(*kg, exchange_to[kg]);
                }
                let refs: Vec<&ExchangeMeta> = metas.values().collect();
                (user_floor, item_wm) = protocol::restored_watermarks(&refs);
                for (kg, m) in metas {
                    through.insert(*kg, m.item_wm);
                }
            }
            StartMode::Savepoint => {
                let (dir, sp) = savepoint.expect("savepoint mode has a savepoint");
                let foreign = sp.job != self.cfg.name;
                let mut by_part: BTreeMap<Option<String>, Vec<u32>> = BTreeMap::new();
                let mut manifests = Vec::new();
                for p in &sp.parts {
                    let url = format!("{dir}/{p}");
                    let (_, m, _) = snapshot::read_part(&url, self.cfg.s3.as_ref())?;
                    let mine: Vec<u32> = (m.kg_start..m.kg_end)
                        .filter(|kg| self.range.contains(kg))
                        .collect();
                    if !mine.is_empty() {
                        by_part.insert(Some(url.clone()), mine);
                    }
                    for i in &m.inputs {
                        positions.insert((i.topic.clone(), i.partition), (i.offset, i.meta));
                    }
                    manifests.push((url, m));
                }
                let covered: BTreeSet<u32> = by_part.values().flatten().copied().collect();
                if covered.len() != kgs.len() {
                    return Err(Error::Config(format!(
                        "savepoint {} does not cover key groups {:?}",
                        sp.id, self.range
                    )));
                }
                let mut loaded = self.load_parts(&by_part, &mut known)?;
                for (url, m) in &manifests {
                    let mine: Vec<u32> = (m.kg_start..m.kg_end)
                        .filter(|kg| self.range.contains(kg))
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    user_floor = user_floor.max(m.user_wm);
                    for kg in mine {
                        let g = &m.groups[&kg];
                        let old = loaded.remove(&kg).unwrap_or_default();
                        // A new generation: the savepoint's senders are done, their queued
                        // entries still apply; frames of older generations are skipped.
                        inboxes.insert(kg, old.renew(PartitionTable::new(gen, workers), m.item_wm));
                        through.insert(kg, m.item_wm);
                        // Another job's savepoint (a new StreamJob started from it) names offsets
                        // of that job's exchange topic: this job's is read from its start (the
                        // savepoint has nothing in flight).
                        let exchange_from = if foreign {
                            ends[&kg].2
                        } else {
                            g.exchange_offset
                        };
                        self.exchange_next.insert(kg, exchange_from);
                        let hi = ends[&kg].1;
                        self.changelog_next.insert(kg, hi);
                        self.state_refs.insert(
                            kg,
                            StateRef {
                                part: Some(url.clone()),
                                changelog_offset: hi,
                                exchange_offset: exchange_from,
                                table_gen: gen,
                                table_senders: workers,
                            },
                        );
                    }
                }
                item_wm = through.values().copied().min().unwrap_or(WM_MIN);
            }
        }
        if !inboxes.is_empty() {
            self.item.resume(item_wm);
            self.receiver = Receiver::new(self.windowing, inboxes, item_wm);
        } else {
            // Committed: floors move up to what was committed.
            self.receiver.raise_floors(&through);
        }
        // Item watermark: advance to what the restored tables allow (outputs of windows
        // emitted before the crash are discarded, the state effects are kept).
        let mut ds = Vec::new();
        self.receiver.advance(&mut ds);
        for d in ds {
            self.deliver(d, true)?;
        }
        self.out = ItemOutput::default();
        let wm = self.receiver.watermark();
        through.retain(|_, t| *t > wm);
        self.item.set_emitted_through(EmittedThrough {
            key_groups: self.cfg.key_groups,
            through,
        });
        self.last_through = self
            .windowing
            .epoch(wm)
            .saturating_mul(self.windowing.slide);

        // Inputs: committed (or savepoint) positions, else the start policy.
        let start = match &self.cfg.source {
            SourceConfig::Kafka(k) => k.start_offsets,
            _ => unreachable!("checked at start"),
        };
        for (i, inp) in self.inputs.iter_mut().enumerate() {
            match positions.get(&(inp.name.clone(), inp.partition)) {
                Some((o, m)) => {
                    inp.next = *o;
                    if let Some(ts) = m.max_ts {
                        self.tracker.observe(i as u32, ts);
                    }
                    if m.idle {
                        self.tracker.set_idle(i as u32, true);
                    }
                }
                None => {
                    let (lo, hi) = kafka::watermarks(&self.consumer, &inp.name, inp.partition)?;
                    inp.next = match start {
                        StartOffsets::Earliest => lo,
                        StartOffsets::Latest => hi,
                    };
                }
            }
        }
        self.user_wm = user_floor;
        self.refresh_remote();
        self.metrics.users.store(self.user.users() as u64, Relaxed);
        self.metrics
            .pane_entries
            .store(self.item.pane_entries() as u64, Relaxed);
        Ok(known)
    }

    /// Build local state from parts (URL → key groups to take from it; `None`: empty).
    pub(super) fn load_parts(
        &mut self,
        by_part: &BTreeMap<Option<String>, Vec<u32>>,
        known: &mut HashMap<String, String>,
    ) -> Result<BTreeMap<u32, Inbox>> {
        let state_dir = self.state_dir.clone();
        // Close a database opened by an earlier attempt (the stages hold it too).
        self.detach_stores();
        self.state = None;
        let parts: Vec<(&String, &Vec<u32>)> = by_part
            .iter()
            .filter_map(|(u, k)| u.as_ref().map(|u| (u, k)))
            .collect();
        // One part holding exactly this worker's key groups: take its files as they are.
        let fast = match parts.as_slice() {
            [(url, kgs)] => {
                let (loc, m, base) = snapshot::read_part(url, self.cfg.s3.as_ref())?;
                if m.kg_start == self.range.start
                    && m.kg_end == self.range.end
                    && kgs.len() == self.range.len()
                {
                    let reuse = !m.self_contained
                        && url.starts_with(&self.checkpoint_url_prefix)
                        && m.worker == self.opts.index;
                    // Only this worker's own parts can be the one it kept (under that URL).
                    let identity = reuse.then(|| local::identity(url, m.created_at_ms));
                    let state = StateManager::restore_files(
                        &state_dir,
                        loc.store.as_ref(),
                        &base,
                        &m.files,
                        reuse,
                        identity.as_deref(),
                    )?;
                    if reuse {
                        *known = state.known_files().clone();
                    }
                    let r = state.restore_stats();
                    tracing::info!(part = %url, reused_local = r.reused_local, downloaded_bytes = r.downloaded_bytes, "state restored from one part");
                    self.metrics
                        .restore_reused_local
                        .store(r.reused_local, Relaxed);
                    self.metrics
                        .restore_downloaded_bytes
                        .store(r.downloaded_bytes, Relaxed);
                    self.state = Some(state);
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        if !fast {
            self.state = Some(StateManager::create(&state_dir)?);
            let mut downloaded = 0u64;
            for (url, kgs) in &parts {
                let (loc, m, base): (Located, PartManifest, String) =
                    snapshot::read_part(url, self.cfg.s3.as_ref())?;
                let tmp = self.scratch.join(format!("part-{}-{}", m.worker, m.seq));
                let _ = std::fs::remove_dir_all(&tmp);
                snapshot::download_part(&loc, &base, &m.files, &tmp)?;
                downloaded += m.files.iter().map(|f| f.size).sum::<u64>();
                let want: BTreeSet<u32> = kgs.iter().copied().collect();
                let n = self.state().ingest_from(&tmp, |kg| want.contains(&kg))?;
                tracing::info!(part = %url, keys = n, "loaded key groups from a part");
                let _ = std::fs::remove_dir_all(&tmp);
            }
            self.metrics.restore_reused_local.store(false, Relaxed);
            self.metrics
                .restore_downloaded_bytes
                .store(downloaded, Relaxed);
        }
        // Route the state to the stages: panes into memory up to the budget, inboxes into
        // memory; histories stay in the database, read on their user's first event.
        self.attach_stores();
        let mut inboxes = BTreeMap::new();
        let item = &mut self.item;
        let state = self.state.as_ref().expect("opened above");
        for kg in self.range.clone() {
            state.scan_panes(kg, &mut item.restorer(kg))?;
            state.for_each_in(kg, INBOXES, |_, value| {
                inboxes.insert(kg, Inbox::decode(value)?);
                Ok(())
            })?;
        }
        Ok(inboxes)
    }

    /// Replay history appends from the changelog (to its end) into the user stage.
    pub(super) fn replay_changelog(
        &mut self,
        kgs: &[u32],
        from: impl Fn(u32) -> i64,
    ) -> Result<()> {
        let started = Instant::now();
        let mut n = 0u64;
        let topic = self.topics.changelog.clone();
        let ranges: Vec<(u32, i64, i64)> = kgs
            .iter()
            .map(|kg| (*kg, from(*kg), self.changelog_next[kg]))
            .collect();
        let user = &mut self.user;
        read_ranges(&self.cfg, &self.topics, &topic, &ranges, |kg, payload| {
            let mut failed = None;
            n += changelog::decode(payload, |user_id, entry| {
                if failed.is_none() {
                    failed = user.replay_append(kg, user_id, entry).err();
                }
            })?;
            match failed {
                Some(e) => Err(e.into()),
                None => Ok(user.maintain()?),
            }
        })?;
        tracing::info!(
            appends = n,
            ms = started.elapsed().as_millis() as u64,
            "changelog replayed"
        );
        Ok(())
    }

    /// Replay the exchange between the parts' offsets and the committed ones into the item
    /// stage (through the receiver, so alignment is the same as the first time).
    pub(super) fn replay_exchange(
        &mut self,
        kgs: &[u32],
        from: impl Fn(u32) -> i64,
        to: &BTreeMap<u32, i64>,
    ) -> Result<()> {
        let started = Instant::now();
        let topic = self.topics.exchange.clone();
        let ranges: Vec<(u32, i64, i64)> = kgs.iter().map(|kg| (*kg, from(*kg), to[kg])).collect();
        let mut frames = Vec::new();
        read_ranges(&self.cfg, &self.topics, &topic, &ranges, |kg, payload| {
            frames.push((kg, wire::decode_frame(payload)?));
            Ok(())
        })?;
        let n = frames.len();
        let mut ds = Vec::new();
        for (kg, (from, entries)) in frames {
            self.receiver.push(kg, from, entries, &mut ds);
            for d in ds.drain(..) {
                self.deliver(d, true)?;
            }
        }
        self.out = ItemOutput::default();
        tracing::info!(
            frames = n,
            ms = started.elapsed().as_millis() as u64,
            "exchange replayed"
        );
        Ok(())
    }

    /// Read the trending topic's recent tail into the board.
    pub(super) fn read_trending(&mut self) -> Result<()> {
        let (lo, hi) = kafka::watermarks(&self.consumer, &self.topics.trending, 0)?;
        let from = lo.max(hi - TRENDING_TAIL);
        let topic = self.topics.trending.clone();
        let board = &mut self.board;
        read_ranges(
            &self.cfg,
            &self.topics,
            &topic,
            &[(0, from, hi)],
            |_, payload| {
                if let Ok(c) = serde_json::from_slice::<Contribution>(payload) {
                    board.apply(c);
                }
                Ok(())
            },
        )?;
        self.trending_next = hi;
        Ok(())
    }

    pub(super) fn assign(&mut self) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for inp in &self.inputs {
            tpl.add_partition_offset(&inp.name, inp.partition, Offset::Offset(inp.next))
                .map_err(|e| kafka::kafka_error("assign", e))?;
        }
        for (kg, next) in &self.exchange_next {
            tpl.add_partition_offset(&self.topics.exchange, *kg as i32, Offset::Offset(*next))
                .map_err(|e| kafka::kafka_error("assign", e))?;
        }
        tpl.add_partition_offset(&self.topics.trending, 0, Offset::Offset(self.trending_next))
            .map_err(|e| kafka::kafka_error("assign", e))?;
        self.consumer
            .assign(&tpl)
            .map_err(|e| kafka::kafka_error("assign", e))
    }
}

/// Read `(key group = partition, from, to)` ranges of one topic with a read_committed
/// consumer of its own; `to` is exclusive. Records of aborted transactions and control
/// records are skipped by Kafka, so a range may deliver fewer records than `to − from`.
pub(super) fn read_ranges(
    cfg: &JobConfig,
    topics: &Topics,
    topic: &str,
    ranges: &[(u32, i64, i64)],
    mut f: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<()> {
    let mut open: BTreeMap<i32, (u32, i64)> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for (kg, from, to) in ranges {
        if from < to {
            open.insert(*kg as i32, (*kg, *to));
            tpl.add_partition_offset(topic, *kg as i32, Offset::Offset(*from))
                .map_err(|e| kafka::kafka_error("replay assign", e))?;
        }
    }
    if open.is_empty() {
        return Ok(());
    }
    let consumer = kafka::consumer(cfg, topics, true)?;
    consumer
        .assign(&tpl)
        .map_err(|e| kafka::kafka_error("replay assign", e))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !open.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Kafka(format!(
                "replaying {topic}: partitions {:?} did not reach their end",
                open.keys().collect::<Vec<_>>()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                // Control records at the end of a range are not delivered: a partition
                // whose position reached its end is done.
                let pos = consumer
                    .position()
                    .map_err(|e| kafka::kafka_error("replay position", e))?;
                for e in pos.elements_for_topic(topic) {
                    if let Offset::Offset(o) = e.offset() {
                        if open.get(&e.partition()).is_some_and(|(_, to)| o >= *to) {
                            open.remove(&e.partition());
                        }
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(p) = kafka::partition_eof(&e) {
                    open.remove(&p);
                } else {
                    tracing::warn!(topic, error = %e, "replay poll");
                }
            }
            Some(Ok(m)) => {
                let p = m.partition();
                let Some((kg, to)) = open.get(&p).copied() else {
                    continue;
                };
                if m.offset() >= to {
                    open.remove(&p);
                    continue;
                }
                f(kg, m.payload().unwrap_or_default())?;
                if m.offset() + 1 >= to {
                    open.remove(&p);
                }
            }
        }
    }
    Ok(())
}
