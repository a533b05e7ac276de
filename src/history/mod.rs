//! Per-customer history features: what the customer did before this payment.
//!
//! ONE implementation, called by the trainer over history in event-time order
//! (`offline`) and by the scorer online, partition by partition
//! (`HistoryState::observe`), so the two cannot disagree: training/serving
//! skew in exactly these features is the classic way fraud models fail.
//!
//! Point in time: a payment's features come from the customer's payments
//! strictly before it (in stream order); then it is recorded. Features
//! (`CUSTOMER_FEATURES`), each a function of the customer's payments in the
//! last 30 steps (one step = one day of event time) only:
//! - count and amount sum in the last 1, 7 and 30 steps (`ln(1 + x)`),
//! - the amount against the customer's mean over the last 30 steps
//!   (`ln((amount + 1) / (mean + 1))`, 0 without history),
//! - steps since the previous payment, capped at 30, over 30,
//! - distinct merchants in the last 30 steps (`ln(1 + n)`),
//! - whether the customer has no payment in the last 30 steps.
//!
//! Why everything is windowed (the "running mean" and "distinct merchants"
//! too): the state is then a function of the last 30 steps of the input alone,
//! so a scorer that restarts or gains a partition rebuilds it exactly by
//! re-reading that window of the topic, and customers idle longer than the
//! window can be evicted without changing any feature. Amounts are summed
//! in whole cents: integer sums do not depend on the order they were added
//! in, so running sums per window (a payment costs the same however many
//! came before) end equal however a replay started.
//!
//! Time: a payment earlier than the customer's latest counts at the latest
//! (`effective time`), so each customer's time never goes back. Eviction
//! assumes event times within a partition run at most `LATENESS_STEPS` behind
//! the newest seen; later stragglers are still scored, but their features may
//! then differ from the trainer's.
//!
//! The per-merchant fraud rate is not customer state: it is learned by the
//! trainer from its training window (`MerchantRates`) and shipped in the
//! model's feature spec.

mod online;

use std::collections::{BTreeMap, VecDeque};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::payment::{Payment, STEP_MS};
pub use online::{OnlineHistory, Position, Replay, ReplayError};

/// The windows, in steps (days of event time).
pub const WINDOWS: [i64; 3] = [1, 7, 30];
/// The longest window: state older than this never matters.
pub const HORIZON_MS: i64 = 30 * STEP_MS;
/// How far behind the newest event time of a partition a payment may be
/// and still get exactly the trainer's features (see the module comment).
pub const LATENESS_STEPS: i64 = 1;
/// Payments kept per customer (the newest); counts saturate there.
pub const MAX_ENTRIES: usize = 1024;
/// Distinct merchants counted per customer at most.
const MAX_MERCHANTS: usize = 64;

/// Names of the customer features, in column order.
pub const CUSTOMER_FEATURES: [&str; 10] = [
    "customer_count_1d",
    "customer_count_7d",
    "customer_count_30d",
    "customer_amount_1d",
    "customer_amount_7d",
    "customer_amount_30d",
    "amount_vs_customer_mean_30d",
    "days_since_previous",
    "customer_merchants_30d",
    "customer_new_30d",
];
/// Customer features per payment.
pub const CUSTOMER_WIDTH: usize = CUSTOMER_FEATURES.len();

/// One payment's customer features, as the model sees them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CustomerFeatures(pub [f32; CUSTOMER_WIDTH]);

impl CustomerFeatures {
    /// The features of a customer with no payment in the window.
    pub fn new_customer(amount: f64) -> Self {
        CustomerHistory::default().features(0, amount)
    }
}

/// One earlier payment of a customer.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Effective event time (never before the customer's previous one).
    time: i64,
    /// The amount in whole cents (`cents`): sums of integers do not depend
    /// on the order they were added in, so running sums stay exact however
    /// a replay started.
    cents: i64,
    merchant: u64,
}

/// Amounts count in the sums up to this many cents (10^13 in money): 1,024
/// of them cannot overflow.
const MAX_CENTS: i64 = 1_000_000_000_000_000;

/// An amount in whole cents, as the sums hold it.
fn cents(amount: f64) -> i64 {
    (amount * 100.0).round().clamp(0.0, MAX_CENTS as f64) as i64
}

/// The short windows kept with running sums (the longest is the whole history).
const SHORT: usize = 2;

/// One customer's payments in the window, oldest first, with running counts
/// and sums per window, so a payment costs the same however many came before.
#[derive(Debug, Clone, Default)]
pub struct CustomerHistory {
    entries: VecDeque<Entry>,
    /// Effective time of the latest payment (0 before the first).
    latest: i64,
    /// How many of `entries` are at each merchant (no zeros): distinct
    /// merchants without a scan per payment.
    merchants: Vec<(u64, u32)>,
    /// Per short window (1 and 7 steps): its payments are `entries[start..]`.
    starts: [usize; SHORT],
    /// Cents of the payments in each window (1, 7, 30 steps: the last is every entry).
    sums: [i64; 3],
}

impl CustomerHistory {
    fn effective(&self, time: i64) -> i64 {
        time.max(self.latest)
    }

    /// Drops what `now` no longer sees: payments older than the longest
    /// window leave, the short windows' starts move on. Times only grow per
    /// customer, so nothing dropped is ever seen again.
    fn advance(&mut self, now: i64) {
        while self.entries.front().is_some_and(|e| now - e.time >= HORIZON_MS) {
            self.pop_front();
        }
        for (w, steps) in WINDOWS[..SHORT].iter().enumerate() {
            while let Some(e) = self.entries.get(self.starts[w]).filter(|e| now - e.time >= steps * STEP_MS) {
                self.sums[w] -= e.cents;
                self.starts[w] += 1;
            }
        }
    }

    fn pop_front(&mut self) {
        let Some(gone) = self.entries.pop_front() else { return };
        self.sums[SHORT] -= gone.cents;
        for w in 0..SHORT {
            if self.starts[w] > 0 {
                self.starts[w] -= 1;
            } else {
                self.sums[w] -= gone.cents;
            }
        }
        let at =
            self.merchants.iter().position(|(m, _)| *m == gone.merchant).expect("every entry's merchant is counted");
        self.merchants[at].1 -= 1;
        if self.merchants[at].1 == 0 {
            self.merchants.swap_remove(at);
        }
    }

    /// The features of a payment of `amount` at effective time `now`, from
    /// the running sums (after `advance(now)`).
    fn take(&mut self, now: i64, amount: f64) -> CustomerFeatures {
        self.advance(now);
        let n = self.entries.len();
        let count = [n - self.starts[0], n - self.starts[1], n];
        let since = self.entries.back().map(|last| now - last.time);
        finish(count, self.sums, self.merchants.len(), since, amount)
    }

    /// The same features without changing anything (REST reads): the
    /// window's payments counted one by one.
    fn features(&self, now: i64, amount: f64) -> CustomerFeatures {
        let mut count = [0usize; 3];
        let mut sums = [0i64; 3];
        for entry in self.entries.iter().rev() {
            let age = now - entry.time;
            if age >= HORIZON_MS {
                break;
            }
            for (w, steps) in WINDOWS.iter().enumerate() {
                if age < steps * STEP_MS {
                    count[w] += 1;
                    sums[w] += entry.cents;
                }
            }
        }
        // Entries kept but out of this payment's window (times only grow, so a prefix).
        let stale = self.entries.iter().take_while(|e| now - e.time >= HORIZON_MS).count();
        let mut distinct = self.merchants.len();
        if stale > 0 {
            let old = || self.entries.iter().take(stale);
            distinct -= self
                .merchants
                .iter()
                .filter(|(m, n)| old().filter(|e| e.merchant == *m).count() == *n as usize)
                .count();
        }
        let since = self.entries.back().map(|last| now - last.time);
        finish(count, sums, distinct, since, amount)
    }

    fn record(&mut self, now: i64, amount: f64, merchant: u64) {
        self.advance(now);
        let cents = cents(amount);
        self.entries.push_back(Entry { time: now, cents, merchant });
        for sum in &mut self.sums {
            *sum += cents;
        }
        match self.merchants.iter_mut().find(|(m, _)| *m == merchant) {
            Some((_, n)) => *n += 1,
            None => self.merchants.push((merchant, 1)),
        }
        self.latest = now;
        while self.entries.len() > MAX_ENTRIES {
            self.pop_front();
        }
    }
}

/// The features from a window's counts and cents (1, 7, 30 steps), its
/// distinct merchants and the time since the previous payment: one formula
/// for the running and the counted path, so they agree to the bit.
fn finish(count: [usize; 3], sums: [i64; 3], distinct: usize, since: Option<i64>, amount: f64) -> CustomerFeatures {
    let money = |cents: i64| cents as f64 / 100.0;
    let n30 = count[2];
    let vs_mean = if n30 == 0 { 0.0 } else { ((amount + 1.0) / (money(sums[2]) / n30 as f64 + 1.0)).ln() };
    let since = since.map_or(1.0, |ms| (ms as f64 / STEP_MS as f64).min(30.0) / 30.0);
    let ln = |x: f64| x.ln_1p() as f32;
    CustomerFeatures([
        ln_count(count[0]),
        ln_count(count[1]),
        ln_count(n30),
        ln(money(sums[0])),
        ln(money(sums[1])),
        ln(money(sums[2])),
        vs_mean as f32,
        since as f32,
        ln_count(distinct.min(MAX_MERCHANTS)),
        if n30 == 0 { 1.0 } else { 0.0 },
    ])
}

/// `ln(1 + n)` of a count, looked up (counts stop at `MAX_ENTRIES`): the
/// same value as computing it, at a fraction of the cost.
fn ln_count(n: usize) -> f32 {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    let table = TABLE.get_or_init(|| (0..=MAX_ENTRIES).map(|n| (n as f64).ln_1p() as f32).collect());
    table[n.min(MAX_ENTRIES)]
}

/// A stable 64-bit hash of a merchant id (FNV-1a): the same in every process.
fn merchant_hash(merchant: &str) -> u64 {
    merchant.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The customer histories of one partition (online) or of a whole data set
/// (offline): the same code either way.
#[derive(Debug, Default)]
pub struct HistoryState {
    customers: foldhash::HashMap<String, CustomerHistory>,
    /// Newest effective time seen.
    latest: i64,
    /// `latest` at the last eviction sweep.
    swept: i64,
}

impl HistoryState {
    /// `payment`'s customer features, from the customer's earlier payments,
    /// moving its windows on (the stream's path; `features` reads only).
    pub fn take(&mut self, payment: &Payment) -> CustomerFeatures {
        match self.customers.get_mut(&payment.customer) {
            Some(history) => {
                let now = history.effective(payment.event_time);
                history.take(now, payment.amount)
            }
            None => CustomerFeatures::new_customer(payment.amount),
        }
    }

    /// `payment`'s customer features, from the customer's earlier payments,
    /// changing nothing (REST).
    pub fn features(&self, payment: &Payment) -> CustomerFeatures {
        match self.customers.get(&payment.customer) {
            Some(history) => history.features(history.effective(payment.event_time), payment.amount),
            None => CustomerHistory::default().features(payment.event_time, payment.amount),
        }
    }

    /// Records `payment` as the customer's latest (after its features were taken).
    pub fn record(&mut self, payment: &Payment) {
        let history = match self.customers.get_mut(&payment.customer) {
            Some(history) => history,
            None => self.customers.entry(payment.customer.clone()).or_default(),
        };
        let now = history.effective(payment.event_time);
        history.record(now, payment.amount, merchant_hash(&payment.merchant));
        self.latest = self.latest.max(now);
        if self.latest - self.swept >= STEP_MS {
            self.evict();
        }
    }

    /// The features of `payment`, then records it: one step of the stream.
    pub fn observe(&mut self, payment: &Payment) -> CustomerFeatures {
        let features = self.take(payment);
        self.record(payment);
        features
    }

    /// Drops customers idle for longer than the window (plus the lateness
    /// allowed): no later payment's features can depend on them.
    fn evict(&mut self) {
        let cutoff = self.latest - HORIZON_MS - LATENESS_STEPS * STEP_MS;
        self.customers.retain(|_, h| h.latest > cutoff);
        self.swept = self.latest;
    }

    /// Whether `customer` has history here.
    pub fn knows(&self, customer: &str) -> bool {
        self.customers.contains_key(customer)
    }

    /// Customers held.
    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    /// Payments held, over all customers.
    pub fn entries(&self) -> usize {
        self.customers.values().map(|h| h.entries.len()).sum()
    }

    /// Heap bytes held (allocated capacity: ids, entries, the map's table).
    pub fn memory_bytes(&self) -> usize {
        let table = self.customers.capacity() * (std::mem::size_of::<(String, CustomerHistory)>() + 1);
        let held: usize = self
            .customers
            .iter()
            .map(|(id, h)| {
                id.capacity()
                    + h.entries.capacity() * std::mem::size_of::<Entry>()
                    + h.merchants.capacity() * std::mem::size_of::<(u64, u32)>()
            })
            .sum();
        table + held
    }
}

/// The customer features of every payment (in the given order), computed
/// over them as one history in event-time order (ties in the given order):
/// what the trainer sees, and what a scorer computes online for the same stream.
pub fn offline<'a>(payments: impl IntoIterator<Item = &'a Payment>) -> Vec<CustomerFeatures> {
    let payments: Vec<&Payment> = payments.into_iter().collect();
    let mut order: Vec<usize> = (0..payments.len()).collect();
    order.sort_by_key(|&i| payments[i].event_time);
    let mut state = HistoryState::default();
    let mut out = vec![CustomerFeatures([0.0; CUSTOMER_WIDTH]); payments.len()];
    for i in order {
        out[i] = state.observe(payments[i]);
    }
    out
}

/// Smoothed fraud rates per merchant, learned from a training window and
/// shipped with the model: a merchant's rate shrinks towards its category's
/// (and a category's towards the overall rate) by `prior` pseudo-payments,
/// so a merchant seen a few times does not get a rate of 0 or 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MerchantRates {
    /// Pseudo-payments of the prior.
    pub prior: f64,
    /// Fraud rate over the whole window.
    pub overall: f64,
    pub categories: BTreeMap<String, f64>,
    pub merchants: BTreeMap<String, f64>,
}

/// Pseudo-payments behind each smoothed rate.
pub const DEFAULT_PRIOR: f64 = 20.0;

impl MerchantRates {
    /// Learns the rates from `train` (labelled payments; unlabelled ones are skipped).
    pub fn fit<'a>(train: impl IntoIterator<Item = &'a Payment>, prior: f64) -> Self {
        let mut overall = (0u64, 0u64);
        let mut categories: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        let mut merchants: BTreeMap<&str, (&str, u64, u64)> = BTreeMap::new();
        for p in train {
            let Some(fraud) = p.fraud else { continue };
            let f = u64::from(fraud);
            overall = (overall.0 + 1, overall.1 + f);
            let c = categories.entry(&p.category).or_default();
            *c = (c.0 + 1, c.1 + f);
            let m = merchants.entry(&p.merchant).or_insert((&p.category, 0, 0));
            *m = (m.0, m.1 + 1, m.2 + f);
        }
        let overall = if overall.0 == 0 { 0.0 } else { overall.1 as f64 / overall.0 as f64 };
        let smooth = |n: u64, frauds: u64, prior_rate: f64| (frauds as f64 + prior * prior_rate) / (n as f64 + prior);
        let categories: BTreeMap<String, f64> =
            categories.into_iter().map(|(c, (n, f))| (c.to_string(), smooth(n, f, overall))).collect();
        let merchants = merchants
            .into_iter()
            .map(|(m, (c, n, f))| (m.to_string(), smooth(n, f, categories.get(c).copied().unwrap_or(overall))))
            .collect();
        Self { prior, overall, categories, merchants }
    }

    /// The rate of `merchant`; one unseen in training gets its category's,
    /// an unseen category the overall rate.
    pub fn rate(&self, merchant: &str, category: &str) -> f64 {
        self.merchants.get(merchant).or_else(|| self.categories.get(category)).copied().unwrap_or(self.overall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pay(customer: &str, step: i64, ms: i64, merchant: &str, amount: f64) -> Payment {
        Payment {
            payment_id: format!("{customer}-{step}-{ms}"),
            event_time: step * STEP_MS + ms,
            step: step as i32,
            customer: customer.into(),
            age: "3".into(),
            gender: "F".into(),
            zipcode_ori: "28007".into(),
            merchant: merchant.into(),
            zip_merchant: "28007".into(),
            category: "es_food".into(),
            amount,
            fraud: Some(false),
        }
    }

    /// The definition, computed the slow way: every earlier payment of the customer, from scratch.
    fn naive(earlier: &[&Payment], p: &Payment) -> CustomerFeatures {
        let mut now = p.event_time;
        let mut times = Vec::new();
        for e in earlier {
            let t = times.last().map_or(e.event_time, |&l: &i64| e.event_time.max(l));
            times.push(t);
        }
        if let Some(&l) = times.last() {
            now = now.max(l);
        }
        let recent: Vec<(i64, &Payment)> = times
            .iter()
            .copied()
            .zip(earlier.iter().copied())
            .rev()
            .take_while(|(t, _)| now - t < HORIZON_MS)
            .collect();
        let recent: Vec<_> = recent.into_iter().take(MAX_ENTRIES).collect();
        let within = |steps: i64| recent.iter().filter(move |(t, _)| now - t < steps * STEP_MS);
        let ln = |x: f64| x.ln_1p() as f32;
        let (n30, s30) = (within(30).count(), within(30).map(|(_, e)| e.amount).sum::<f64>());
        let mut merchants: Vec<&str> = recent.iter().map(|(_, e)| e.merchant.as_str()).collect();
        merchants.sort();
        merchants.dedup();
        CustomerFeatures([
            ln(within(1).count() as f64),
            ln(within(7).count() as f64),
            ln(n30 as f64),
            ln(within(1).map(|(_, e)| e.amount).sum()),
            ln(within(7).map(|(_, e)| e.amount).sum()),
            ln(s30),
            if n30 == 0 { 0.0 } else { ((p.amount + 1.0) / (s30 / n30 as f64 + 1.0)).ln() as f32 },
            times.last().map_or(1.0, |l| (((now - l) as f64 / STEP_MS as f64).min(30.0) / 30.0) as f32),
            ln(merchants.len() as f64),
            if n30 == 0 { 1.0 } else { 0.0 },
        ])
    }

    fn close(a: &CustomerFeatures, b: &CustomerFeatures) -> bool {
        a.0.iter().zip(b.0).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
    }

    #[test]
    fn features_count_only_what_came_before_within_each_window() {
        let mut state = HistoryState::default();
        let first = state.observe(&pay("C1", 10, 0, "M1", 100.0));
        assert_eq!(first, CustomerFeatures::new_customer(100.0));
        assert_eq!(first.0[9], 1.0, "new customer");
        assert_eq!(first.0[7], 1.0, "no previous payment: capped");
        state.observe(&pay("C1", 10, 1000, "M2", 50.0));
        state.observe(&pay("C2", 10, 2000, "M1", 999.0));
        let f = state.observe(&pay("C1", 12, 0, "M1", 300.0));
        let ln = |x: f64| x.ln_1p() as f32;
        assert_eq!(f.0[0], 0.0, "nothing in the last day");
        assert_eq!(f.0[1], ln(2.0), "two in the last 7 days");
        assert_eq!(f.0[4], ln(150.0));
        assert_eq!(f.0[6], ((301.0f64) / 76.0).ln() as f32, "against the mean of 75");
        assert!((f.0[7] - (2.0 * STEP_MS as f64 - 1000.0) as f32 / STEP_MS as f32 / 30.0).abs() < 1e-6);
        assert_eq!(f.0[8], ln(2.0), "two merchants");
        assert_eq!(f.0[9], 0.0);
        // 30 steps later the old payments are out of every window.
        let late = state.observe(&pay("C1", 43, 0, "M3", 10.0));
        assert_eq!(late.0[2], 0.0);
        assert_eq!(late.0[7], 1.0);
    }

    #[test]
    fn a_payment_earlier_than_the_customers_latest_counts_at_the_latest() {
        let mut state = HistoryState::default();
        state.observe(&pay("C1", 5, 5000, "M1", 10.0));
        let f = state.observe(&pay("C1", 5, 1000, "M1", 10.0));
        assert_eq!(f.0[7], 0.0, "no time went back");
        assert_eq!(f.0[0], 1f32.ln_1p());
    }

    #[test]
    fn idle_customers_are_evicted_without_changing_features() {
        let mut state = HistoryState::default();
        state.observe(&pay("C1", 0, 0, "M1", 10.0));
        for step in 0..40 {
            state.observe(&pay("C2", step, 0, "M1", 10.0));
        }
        assert_eq!(state.customers(), 1, "C1 idle for 39 steps is gone");
        assert_eq!(state.features(&pay("C1", 40, 0, "M1", 10.0)), CustomerFeatures::new_customer(10.0));
        assert!(state.memory_bytes() > 0);
    }

    #[test]
    fn a_busy_customer_keeps_its_newest_payments_and_both_paths_agree() {
        let mut state = HistoryState::default();
        for i in 0..(MAX_ENTRIES as i64 + 100) {
            let p = pay("C1", 0, i, &format!("M{}", i % 70), 1.25);
            assert_eq!(state.features(&p), state.take(&p), "payment {i}");
            state.record(&p);
        }
        let next = pay("C1", 0, 5_000, "M1", 1.0);
        let f = state.features(&next);
        assert_eq!(f, state.take(&next));
        assert_eq!(f.0[0], (MAX_ENTRIES as f64).ln_1p() as f32, "counts saturate at the entries kept");
        assert_eq!(f.0[3], (MAX_ENTRIES as f64 * 1.25).ln_1p() as f32, "sums over the entries kept");
        assert_eq!(f.0[8], (MAX_MERCHANTS as f64).ln_1p() as f32, "distinct merchants saturate");
    }

    #[test]
    fn merchant_rates_shrink_towards_the_category_and_fall_back() {
        let mut train = Vec::new();
        for i in 0..100 {
            let mut p = pay("C1", 0, i, if i < 10 { "Mbad" } else { "Mok" }, 1.0);
            p.fraud = Some(i < 8);
            train.push(p);
        }
        let rates = MerchantRates::fit(&train, 20.0);
        assert!((rates.overall - 0.08).abs() < 1e-12);
        let category = rates.categories["es_food"];
        assert!((category - 0.08).abs() < 1e-12, "category rate equals overall here: {category}");
        assert!((rates.rate("Mbad", "es_food") - (8.0 + 20.0 * 0.08) / 30.0).abs() < 1e-12);
        assert!((rates.rate("Mok", "es_food") - (20.0 * 0.08) / 110.0).abs() < 1e-12);
        assert_eq!(rates.rate("Mnew", "es_food"), category);
        assert_eq!(rates.rate("Mnew", "es_travel"), rates.overall);
    }

    proptest! {
        /// Online (incremental, evicting) equals the definition computed from scratch,
        /// and a replay of only the last window rebuilds the same features.
        #[test]
        fn online_equals_the_definition_and_a_window_replay(
            events in prop::collection::vec((0usize..4, 0i64..3 * STEP_MS, 0usize..5, 1u32..50_000), 1..300)
        ) {
            let mut time = 0;
            let payments: Vec<Payment> = events.iter().enumerate().map(|(i, (c, dt, m, cents))| {
                time += dt;
                let mut p = pay(&format!("C{c}"), 0, time, &format!("M{m}"), f64::from(*cents) / 100.0);
                p.payment_id = i.to_string();
                p
            }).collect();
            // The running path (what the stream takes) equals the counted one (what REST reads).
            let mut state = HistoryState::default();
            let mut online = Vec::new();
            for p in &payments {
                let read = state.features(p);
                let taken = state.observe(p);
                prop_assert_eq!(read, taken);
                online.push(taken);
            }
            prop_assert_eq!(&online, &offline(&payments));
            for (i, p) in payments.iter().enumerate() {
                let earlier: Vec<&Payment> = payments[..i].iter().filter(|e| e.customer == p.customer).collect();
                let want = naive(&earlier, p);
                prop_assert!(close(&online[i], &want), "payment {i}: {:?} vs {:?}", online[i], want);
            }
            // Replaying from the first payment within the window (plus lateness) of a cut gives the same state.
            let cut = payments.len() / 2;
            let since = payments[cut].event_time - HORIZON_MS - LATENESS_STEPS * STEP_MS;
            let start = payments.iter().position(|p| p.event_time >= since).unwrap_or(cut);
            let mut replay = HistoryState::default();
            for p in &payments[start..cut] {
                replay.record(p);
            }
            for (i, p) in payments.iter().enumerate().skip(cut) {
                prop_assert_eq!(replay.observe(p), online[i], "payment {} after a replay from {}", i, start);
            }
        }
    }
}
