//! The charts of the overview and of a client's page, drawn here as SVG: records and
//! batches completed per minute, accepted → completed latency (p50, p95, p99) and queue
//! depth by state, over the last hour (a point a minute) and the last day (a point each
//! quarter of an hour). No script draws them, so they need nothing beyond the page's own
//! stylesheet, work without the script, and refresh with the page's live regions.
//!
//! They draw the leader's minute samples ([`dataflow_platform::ledger::charts`]) and, as
//! their last point, the minute in progress, measured when the page is read, so a batch
//! that completes shows at once rather than when its minute is sampled.

use dataflow_contracts::ClientId;
use dataflow_platform::ledger::Db;
use dataflow_platform::ledger::charts::{Depth, MINUTE_MS, Sample, minute_of};
use maud::{Markup, html};

use super::layout;
use crate::error::ApiResult;

/// A span of time a chart covers, and how it is cut into points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    id: &'static str,
    title: &'static str,
    buckets: i64,
    bucket_minutes: i64,
    /// The x axis' labels: its start, middle and end.
    axis: [&'static str; 3],
}

const HOUR: Window = Window {
    id: "hour",
    title: "Last hour",
    buckets: 60,
    bucket_minutes: 1,
    axis: ["−60 min", "−30 min", "now"],
};

const DAY: Window = Window {
    id: "day",
    title: "Last day",
    buckets: 96,
    bucket_minutes: 15,
    axis: ["−24 h", "−12 h", "now"],
};

impl Window {
    /// The first bucket of the one `now_minute` (a minute's start) falls in; buckets are
    /// aligned on the clock (a day's on the quarter hour), so they keep their place as
    /// time goes by.
    fn first(&self, now_minute: i64) -> i64 {
        now_minute
            .div_euclid(MINUTE_MS)
            .div_euclid(self.bucket_minutes)
            - (self.buckets - 1)
    }

    /// The start of the window's first bucket, in milliseconds.
    fn since(&self, now_minute: i64) -> i64 {
        self.first(now_minute) * self.bucket_minutes * MINUTE_MS
    }

    /// `samples` (oldest first) gathered into the window's buckets; `None` where no
    /// minute was sampled.
    fn buckets(&self, samples: &[Sample], now_minute: i64) -> Vec<Option<Bucket>> {
        let first = self.first(now_minute);
        let mut buckets: Vec<Option<Bucket>> = vec![None; self.buckets as usize];
        for s in samples {
            let at = s
                .minute
                .div_euclid(MINUTE_MS)
                .div_euclid(self.bucket_minutes)
                - first;
            if let Some(slot) = usize::try_from(at).ok().and_then(|i| buckets.get_mut(i)) {
                slot.get_or_insert_with(Bucket::default).add(s);
            }
        }
        buckets
    }
}

/// The minutes sampled in one bucket: throughput summed (drawn as the mean per minute),
/// latency and depth at their highest minute (a mean would hide the peak a long chart
/// is looked at for).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bucket {
    minutes: u32,
    batches: u64,
    records: u64,
    latency: Option<[u64; 3]>,
    depth: Depth,
}

impl Bucket {
    fn add(&mut self, s: &Sample) {
        self.minutes += 1;
        self.batches += s.batches;
        self.records += s.records;
        if let Some(l) = s.latency {
            let now = [l.p50_ms, l.p95_ms, l.p99_ms];
            let was = self.latency.unwrap_or_default();
            self.latency = Some(std::array::from_fn(|i| was[i].max(now[i])));
        }
        let (d, n) = (&mut self.depth, s.depth);
        d.awaiting_approval = d.awaiting_approval.max(n.awaiting_approval);
        d.ready = d.ready.max(n.ready);
        d.processing = d.processing.max(n.processing);
        d.dead = d.dead.max(n.dead);
    }

    fn per_minute(&self, total: u64) -> f64 {
        total as f64 / f64::from(self.minutes.max(1))
    }
}

/// How a chart's values read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A count per minute (a mean over a bucket, so it may have a fraction).
    PerMinute,
    /// Batches.
    Count,
    Millis,
}

impl Unit {
    fn format(self, v: f64) -> String {
        match self {
            Unit::Millis => layout::age(v.round() as u64),
            Unit::PerMinute | Unit::Count if v >= 1_000.0 => {
                format!("{}k", one_decimal(v / 1_000.0))
            }
            Unit::PerMinute | Unit::Count => one_decimal(v),
        }
    }
}

/// `v` with one decimal, none when it is whole at that precision: `2.5`, `3`.
fn one_decimal(v: f64) -> String {
    let text = format!("{v:.1}");
    text.strip_suffix(".0").map_or(text.clone(), str::to_owned)
}

/// One line of a chart: its points, one per bucket.
struct Series {
    key: &'static str,
    label: &'static str,
    points: Vec<Option<f64>>,
}

impl Series {
    fn of(
        key: &'static str,
        label: &'static str,
        buckets: &[Option<Bucket>],
        value: impl Fn(&Bucket) -> Option<f64>,
    ) -> Series {
        Series {
            key,
            label,
            points: buckets
                .iter()
                .map(|b| b.as_ref().and_then(&value))
                .collect(),
        }
    }

    /// The latest point drawn.
    fn last(&self) -> Option<f64> {
        self.points.iter().rev().find_map(|p| *p)
    }
}

/// The smallest of 1, 2 or 5 times a power of ten at or above `max` (1 for nothing): the
/// top of a chart's scale, so its gridlines fall on round values.
fn scale_top(max: f64) -> f64 {
    if max <= 1.0 {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|top| *top >= max)
        .unwrap_or(10.0 * power)
}

// The drawing's size in SVG units (it scales to its box), and room for the axes' labels.
const WIDTH: f64 = 320.0;
const HEIGHT: f64 = 150.0;
const LEFT: f64 = 46.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 20.0;

/// Where point `i` of `n` falls across the plot.
fn x(i: usize, n: usize) -> f64 {
    LEFT + (WIDTH - LEFT - RIGHT) * i as f64 / (n.max(2) - 1) as f64
}

/// Where `v` falls on a scale up to `top`.
fn y(v: f64, top: f64) -> f64 {
    TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - v / top)
}

/// An SVG path through the points, broken where a point is missing; a point alone is a
/// zero-length stroke, drawn as a dot by its round caps.
fn path(points: &[Option<f64>], top: f64) -> String {
    let mut d = String::new();
    let mut open = false;
    for (i, p) in points.iter().enumerate() {
        match p {
            Some(v) => {
                let cmd = if open { 'L' } else { 'M' };
                d.push_str(&format!(
                    "{cmd}{:.1} {:.1} ",
                    x(i, points.len()),
                    y(*v, top)
                ));
                if !open && points.get(i + 1).is_none_or(Option::is_none) {
                    d.push_str("h0 ");
                }
                open = true;
            }
            None => open = false,
        }
    }
    d.trim_end().to_owned()
}

/// One chart: a titled SVG with its gridlines, axes, a line per series, and a legend with
/// each series' latest value. `data-series` and `data-last` name what each line shows.
fn chart(id: &str, title: &str, unit: Unit, w: &Window, series: &[Series]) -> Markup {
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().flatten())
        .fold(0.0f64, |m, v| m.max(*v));
    let top = scale_top(max);
    let n = series.first().map_or(0, |s| s.points.len());
    let now = |s: &Series| s.last().map_or_else(|| "—".to_owned(), |v| unit.format(v));
    let summary = series
        .iter()
        .map(|s| format!("{} {}", s.label, now(s)))
        .collect::<Vec<_>>()
        .join(", ");
    let (title_id, desc_id) = (format!("{id}-title"), format!("{id}-desc"));
    html! {
        figure.chart {
            figcaption { (title) }
            svg.chart viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img"
                aria-labelledby={ (title_id) " " (desc_id) } data-chart=(id) data-top=(top) {
                title #(title_id) { (title) ", " (w.title.to_lowercase()) }
                desc #(desc_id) { "Latest: " (summary) ". Scale 0 to " (unit.format(top)) "." }
                @for (v, label) in [(0.0, unit.format(0.0)), (top / 2.0, unit.format(top / 2.0)), (top, unit.format(top))] {
                    line.grid x1=(LEFT) x2=(WIDTH - RIGHT) y1=(y(v, top)) y2=(y(v, top)) {}
                    text.tick x=(LEFT - 6.0) y=(y(v, top) + 3.5) text-anchor="end" { (label) }
                }
                @for (i, (label, anchor)) in w.axis.iter().zip(["start", "middle", "end"]).enumerate() {
                    text.tick x=(x(i * (n.max(2) - 1) / 2, n)) y=(HEIGHT - 5.0) text-anchor=(anchor) { (label) }
                }
                @for s in series {
                    path class={ "line s-" (s.key) } d=(path(&s.points, top)) data-series=(s.key)
                        data-last=[s.last().map(|v| v.to_string())] {
                        title { (s.label) ": " (now(s)) }
                    }
                }
            }
            ul.legend {
                @for s in series {
                    li { span class={ "swatch s-" (s.key) } {} (s.label) " " strong { (now(s)) } }
                }
            }
        }
    }
}

/// The four charts of one window.
fn window_charts(w: &Window, samples: &[Sample], now_minute: i64) -> Markup {
    let b = w.buckets(samples, now_minute);
    let latency = |i: usize| move |b: &Bucket| b.latency.map(|l| l[i] as f64);
    let depth = |f: fn(&Depth) -> u64| move |b: &Bucket| Some(f(&b.depth) as f64);
    let records = [Series::of("records", "records", &b, |b| {
        Some(b.per_minute(b.records))
    })];
    let batches = [Series::of("batches", "batches", &b, |b| {
        Some(b.per_minute(b.batches))
    })];
    let latencies = [
        Series::of("p50", "p50", &b, latency(0)),
        Series::of("p95", "p95", &b, latency(1)),
        Series::of("p99", "p99", &b, latency(2)),
    ];
    let depths = [
        Series::of(
            "awaiting_approval",
            "awaiting approval",
            &b,
            depth(|d| d.awaiting_approval),
        ),
        Series::of("ready", "ready", &b, depth(|d| d.ready)),
        Series::of("processing", "processing", &b, depth(|d| d.processing)),
        Series::of("dead", "dead", &b, depth(|d| d.dead)),
    ];
    let id = |what: &str| format!("{what}-{}", w.id);
    html! {
        div.charts data-window=(w.id) {
            h3 { (w.title) }
            div.chart-row {
                (chart(&id("records"), "Records completed per minute", Unit::PerMinute, w, &records))
                (chart(&id("batches"), "Batches completed per minute", Unit::PerMinute, w, &batches))
                (chart(&id("latency"), "Latency, accepted → completed", Unit::Millis, w, &latencies))
                (chart(&id("depth"), "Batches by state", Unit::Count, w, &depths))
            }
        }
    }
}

/// The charts of `client` (the whole fleet's with `None`) over the last hour and day.
pub async fn section(db: &Db, client: Option<&ClientId>) -> ApiResult<Markup> {
    let now_minute = minute_of(db.now_ms().await?);
    let mut samples: Vec<Sample> = db
        .chart_samples(client, DAY.since(now_minute))
        .await?
        .into_iter()
        .filter(|s| s.minute < now_minute)
        .collect();
    // The fleet's sample comes first; a client's is the only one measured.
    let current = db
        .measure_minute(now_minute, client)
        .await?
        .into_iter()
        .next()
        .unwrap_or(Sample {
            client_id: client.cloned(),
            minute: now_minute,
            ..Sample::default()
        });
    samples.push(current);
    Ok(html! {
        p.lead { "Sampled each minute by the fleet's leader and kept for a day; the last point is the minute in progress. A gap is a minute nobody sampled. Over the day, a point is a quarter of an hour: throughput its mean per minute, latency and depth its highest minute." }
        (window_charts(&HOUR, &samples, now_minute))
        (window_charts(&DAY, &samples, now_minute))
    })
}

#[cfg(test)]
mod tests {
    use dataflow_platform::ledger::charts::Latency;

    use super::*;

    fn sample(minute: i64, batches: u64, p99: u64, ready: u64) -> Sample {
        Sample {
            client_id: None,
            minute: minute * MINUTE_MS,
            batches,
            records: batches * 10,
            latency: Some(Latency {
                p50_ms: p99 / 4,
                p95_ms: p99 / 2,
                p99_ms: p99,
            }),
            depth: Depth {
                ready,
                ..Depth::default()
            },
        }
    }

    #[test]
    fn an_hour_has_a_bucket_a_minute_and_gaps_where_nothing_was_sampled() {
        let now = 1_000 * MINUTE_MS;
        assert_eq!(HOUR.since(now), 941 * MINUTE_MS);
        let b = HOUR.buckets(
            &[
                sample(940, 9, 9, 9),
                sample(941, 1, 100, 3),
                sample(1_000, 2, 50, 0),
            ],
            now,
        );
        assert_eq!(b.len(), 60);
        assert_eq!(b[0].map(|b| b.batches), Some(1), "minute 940 is outside");
        assert!(b[1..59].iter().all(Option::is_none));
        assert_eq!(b[59].map(|b| (b.batches, b.records)), Some((2, 20)));
    }

    #[test]
    fn a_days_quarter_hour_sums_throughput_and_keeps_the_peaks() {
        // 1000 minutes is 66 quarter hours and 10 minutes: the last bucket started at 990.
        let now = 1_000 * MINUTE_MS;
        assert_eq!(DAY.since(now), (66 - 95) * 15 * MINUTE_MS);
        let b = DAY.buckets(
            &[
                sample(990, 4, 100, 7),
                sample(995, 2, 300, 2),
                sample(1_000, 0, 200, 1),
            ],
            now,
        );
        assert_eq!(b.len(), 96);
        let last = b[95].unwrap();
        assert_eq!((last.minutes, last.batches), (3, 6));
        assert_eq!(last.per_minute(last.batches), 2.0);
        assert_eq!(last.latency, Some([75, 150, 300]));
        assert_eq!(last.depth.ready, 7);
        assert!(b[94].is_none());
    }

    #[test]
    fn scales_end_on_round_values() {
        assert_eq!(scale_top(0.0), 1.0);
        assert_eq!(scale_top(0.4), 1.0);
        assert_eq!(scale_top(1.5), 2.0);
        assert_eq!(scale_top(3.0), 5.0);
        assert_eq!(scale_top(7.0), 10.0);
        assert_eq!(scale_top(10.0), 10.0);
        assert_eq!(scale_top(1_234.0), 2_000.0);
        assert_eq!(scale_top(50_001.0), 100_000.0);
    }

    #[test]
    fn points_map_onto_the_plot() {
        assert_eq!(x(0, 60), LEFT);
        assert_eq!(x(59, 60), WIDTH - RIGHT);
        assert_eq!(y(0.0, 10.0), HEIGHT - BOTTOM);
        assert_eq!(y(10.0, 10.0), TOP);
    }

    #[test]
    fn lines_break_at_gaps_and_lone_points_are_dots() {
        let d = path(&[Some(0.0), Some(10.0), None, Some(5.0), None], 10.0);
        assert_eq!(d, "M46.0 130.0 L112.0 10.0 M244.0 70.0 h0");
        assert_eq!(path(&[None, None], 1.0), "");
    }

    #[test]
    fn values_read_in_their_unit() {
        assert_eq!(Unit::PerMinute.format(0.0), "0");
        assert_eq!(Unit::PerMinute.format(2.5), "2.5");
        assert_eq!(Unit::Count.format(120.0), "120");
        assert_eq!(Unit::Count.format(999.96), "1000");
        assert_eq!(Unit::PerMinute.format(5_000.0), "5k");
        assert_eq!(Unit::PerMinute.format(2_550.0), "2.5k");
        assert_eq!(Unit::Count.format(25_000.0), "25k");
        assert_eq!(Unit::Millis.format(1_500.0), "1 s");
    }

    #[test]
    fn a_chart_names_its_series_and_their_latest_values() {
        let now = 10 * MINUTE_MS;
        let samples = [sample(8, 3, 900, 4), sample(10, 1, 600, 2)];
        let html = window_charts(&HOUR, &samples, now).into_string();
        for id in ["records-hour", "batches-hour", "latency-hour", "depth-hour"] {
            assert!(
                html.contains(&format!("data-chart=\"{id}\"")),
                "{id}: {html}"
            );
        }
        assert!(
            html.contains(r#"data-series="records" data-last="10""#),
            "{html}"
        );
        assert!(
            html.contains(r#"data-series="p99" data-last="600""#),
            "{html}"
        );
        assert!(
            html.contains(r#"data-series="ready" data-last="2""#),
            "{html}"
        );
        assert!(
            html.contains("<title id=\"depth-hour-title\">Batches by state, last hour</title>"),
            "{html}"
        );
        assert!(html.contains("−60 min") && html.contains("now"), "{html}");
    }
}
