//! The live terminal view of `k2 demo <scenario>` (ratatui over crossterm):
//! the level and each signal against its thresholds, throughput and lag per
//! partition as sparklines, shed by priority, restarts, active faults, the
//! last transitions and what the scenario said. It draws on the alternate
//! screen without raw mode, so Ctrl-C still stops the demo cleanly; the
//! verdict is printed on the normal screen once the view is gone.

use std::collections::{BTreeMap, VecDeque};
use std::io::Stdout;
use std::time::Duration;

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table, Wrap};
use ratatui::{Frame, Terminal};

use crate::actors::supervisor::{DegradationView, PipelineStatus};
use crate::degradation::DegradationLevel;
use crate::faults::ActiveFault;

/// Samples each sparkline keeps (at two a second, a minute).
const HISTORY: usize = 120;
const LEVELS: [&str; 4] = ["SOFT", "GRACEFUL", "AGGRESSIVE", "CIRCUIT_BREAK"];

/// What one frame shows.
pub struct Snapshot<'a> {
    pub title: String,
    pub status: &'a PipelineStatus,
    pub degradation: &'a DegradationView,
    pub faults: &'a [ActiveFault],
    /// `k2_shed_records_total` by priority.
    pub shed: BTreeMap<String, u64>,
    /// What the scenario said, oldest first.
    pub messages: &'a [String],
}

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

/// The terminal while the view is up; dropping it gives the screen back.
/// Meanwhile a panic (a stage's, which its lane survives) is logged instead
/// of written over the view.
pub struct LiveView {
    previous_hook: Option<PanicHook>,
    terminal: Terminal<CrosstermBackend<Stdout>>,
    throughput: VecDeque<u64>,
    lag: BTreeMap<i32, VecDeque<u64>>,
    last_rows: Option<u64>,
    interval: Duration,
}

impl LiveView {
    /// Takes over the terminal (alternate screen, cursor hidden). `interval`
    /// is the time between frames, for the rate.
    pub fn start(interval: Duration) -> std::io::Result<Self> {
        let mut stdout = std::io::stdout();
        execute!(stdout, terminal::EnterAlternateScreen, cursor::Hide)?;
        let mut terminal = Terminal::new(CrosstermBackend::new(stdout))?;
        terminal.clear()?;
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| {
            tracing::error!(panic = %info, "panicked (the live view keeps the terminal; see the log)");
        }));
        Ok(LiveView {
            previous_hook: Some(previous_hook),
            terminal,
            throughput: VecDeque::new(),
            lag: BTreeMap::new(),
            last_rows: None,
            interval,
        })
    }

    pub fn draw(&mut self, snapshot: &Snapshot<'_>) -> std::io::Result<()> {
        let rows = snapshot.status.committer.rows_committed;
        let per_second = self.last_rows.map_or(0, |last| {
            (rows.saturating_sub(last) as f64 / self.interval.as_secs_f64()) as u64
        });
        self.last_rows = Some(rows);
        push(&mut self.throughput, per_second);
        for lane in &snapshot.status.lanes {
            push(
                self.lag.entry(lane.partition).or_default(),
                lane.lag.unwrap_or(0).max(0) as u64,
            );
        }
        let (throughput, lag) = (&self.throughput, &self.lag);
        self.terminal
            .draw(|frame| render(frame, snapshot, throughput, lag))?;
        Ok(())
    }
}

impl Drop for LiveView {
    fn drop(&mut self) {
        if let Some(hook) = self.previous_hook.take() {
            std::panic::set_hook(hook);
        }
        let _ = execute!(
            self.terminal.backend_mut(),
            terminal::LeaveAlternateScreen,
            cursor::Show
        );
    }
}

fn push(history: &mut VecDeque<u64>, value: u64) {
    if history.len() == HISTORY {
        history.pop_front();
    }
    history.push_back(value);
}

fn level_style(level: DegradationLevel) -> Style {
    let colour = match level {
        DegradationLevel::Normal => Color::Green,
        DegradationLevel::Soft => Color::Yellow,
        DegradationLevel::Graceful => Color::LightYellow,
        DegradationLevel::Aggressive => Color::LightRed,
        DegradationLevel::CircuitBreak => Color::Red,
    };
    Style::new().fg(colour).add_modifier(Modifier::BOLD)
}

fn render(
    frame: &mut Frame<'_>,
    s: &Snapshot<'_>,
    throughput: &VecDeque<u64>,
    lag: &BTreeMap<i32, VecDeque<u64>>,
) {
    let [header, middle, bottom] =
        Layout::vertical([Constraint::Length(3), Constraint::Min(12), Constraint::Length(9)])
            .areas(frame.area());
    let view = s.degradation;
    let forced = if view.level == view.auto_level {
        "auto".to_string()
    } else {
        format!("forced; the signals call for {}", view.auto_level)
    };
    let title = Line::from(vec![
        format!("{}   level ", s.title).into(),
        ratatui::text::Span::styled(view.level.to_string(), level_style(view.level)),
        format!(
            " ({forced})   lanes {}   paused {}",
            s.status.lanes.len(),
            view.paused_partitions.len()
        )
        .into(),
    ]);
    frame.render_widget(
        Paragraph::new(title).block(Block::bordered().title(" K2 demo ")),
        header,
    );

    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(middle);
    frame.render_widget(signals_table(view), left);
    render_rates(frame, right, s, throughput, lag);

    let [events, side] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(bottom);
    let mut lines: Vec<Line> = view
        .transitions
        .iter()
        .rev()
        .take(3)
        .map(|t| {
            let at = chrono::DateTime::from_timestamp_millis(t.at_ms)
                .map(|d| d.format("%H:%M:%S").to_string())
                .unwrap_or_default();
            Line::from(format!("{at} {} -> {}: {}", t.from, t.to, t.cause))
        })
        .collect();
    if lines.is_empty() {
        lines.push(Line::from("no level change yet"));
    }
    lines.extend(
        s.messages
            .iter()
            .rev()
            .take(4)
            .rev()
            .map(|m| Line::from(m.clone())),
    );
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" transitions (newest first) and the scenario ")),
        events,
    );
    let shed = if s.shed.is_empty() {
        "none".to_string()
    } else {
        s.shed
            .iter()
            .map(|(p, n)| format!("{p} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let faults = if s.faults.is_empty() {
        "none".to_string()
    } else {
        s.faults
            .iter()
            .map(|f| {
                format!(
                    "#{} {} until {}",
                    f.id,
                    f.request.kind,
                    f.expires_at.get(11..19).unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let restarts: Vec<String> = s
        .status
        .lanes
        .iter()
        .filter(|l| l.restarts > 0)
        .map(|l| format!("p{} x{}", l.partition, l.restarts))
        .collect();
    let side_lines = vec![
        Line::from(format!("shed by priority: {shed}")),
        Line::from(format!(
            "restarts: {} ({})   failed lanes: {}",
            s.status.lane_restarts,
            if restarts.is_empty() {
                "none".to_string()
            } else {
                restarts.join(" ")
            },
            s.status.failed_lanes
        )),
        Line::from(format!("active faults: {faults}")),
        Line::from(format!(
            "committed: {} rows in {} commits   dead letters: {}",
            s.status.committer.rows_committed,
            s.status.committer.commits,
            s.status.committer.dead_letters_committed
        )),
    ];
    frame.render_widget(
        Paragraph::new(side_lines)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(" shedding, restarts, faults ")),
        side,
    );
}

fn signals_table(view: &DegradationView) -> Table<'static> {
    let header = Row::new(
        std::iter::once("signal".to_string())
            .chain(std::iter::once("value".to_string()))
            .chain(LEVELS.iter().map(|l| l.to_string())),
    )
    .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = view.signals.iter().map(|signal| {
        let reached = |threshold: Option<f64>| {
            threshold.is_some_and(|t| {
                if signal.lower_is_worse {
                    signal.value <= t
                } else {
                    signal.value >= t
                }
            })
        };
        let mut cells = vec![Cell::from(signal.name), Cell::from(number(signal.value))];
        for (i, threshold) in signal.escalate.iter().enumerate() {
            let text = threshold.map_or("-".to_string(), number);
            let style = if reached(*threshold) {
                level_style(LEVEL_OF[i])
            } else {
                Style::new().fg(Color::DarkGray)
            };
            cells.push(Cell::from(text).style(style));
        }
        Row::new(cells)
    });
    Table::new(
        rows,
        [
            Constraint::Length(26),
            Constraint::Length(10),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(11),
            Constraint::Length(13),
        ],
    )
    .header(header)
    .block(Block::bordered().title(" signals against the thresholds that raise each level "))
}

const LEVEL_OF: [DegradationLevel; 4] = [
    DegradationLevel::Soft,
    DegradationLevel::Graceful,
    DegradationLevel::Aggressive,
    DegradationLevel::CircuitBreak,
];

fn number(value: f64) -> String {
    if !value.is_finite() {
        "inf".to_string()
    } else if value.abs() >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if value.abs() >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn render_rates(
    frame: &mut Frame<'_>,
    area: Rect,
    s: &Snapshot<'_>,
    throughput: &VecDeque<u64>,
    lag: &BTreeMap<i32, VecDeque<u64>>,
) {
    let [top, rest] = Layout::vertical([Constraint::Length(5), Constraint::Min(3)]).areas(area);
    let now = throughput.back().copied().unwrap_or(0);
    frame.render_widget(
        Sparkline::default()
            .data(throughput.iter().copied().collect::<Vec<_>>())
            .style(Style::new().fg(Color::Cyan))
            .block(Block::bordered().title(format!(" committed rows/s: {now} "))),
        top,
    );
    let block = Block::bordered().title(" lag per partition (records) ");
    let inner = block.inner(rest);
    frame.render_widget(block, rest);
    let shown: Vec<_> = lag.iter().take(inner.height as usize).collect();
    let rows = Layout::vertical(vec![Constraint::Length(1); shown.len()]).split(inner);
    for ((partition, history), row) in shown.into_iter().zip(rows.iter()) {
        let [label, spark] = Layout::horizontal([Constraint::Length(12), Constraint::Min(1)]).areas(*row);
        let current = s
            .status
            .lanes
            .iter()
            .find(|l| l.partition == *partition)
            .and_then(|l| l.lag)
            .unwrap_or(0);
        frame.render_widget(Paragraph::new(format!("p{partition:<3}{current:>8}")), label);
        frame.render_widget(
            Sparkline::default()
                .data(history.iter().copied().collect::<Vec<_>>())
                .style(Style::new().fg(Color::Magenta)),
            spark,
        );
    }
}

/// `k2_shed_records_total` by priority, from the Prometheus text.
pub fn shed_by_priority(metrics: &str) -> BTreeMap<String, u64> {
    let mut shed = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("k2_shed_records_total{"))
    {
        let priority = line
            .split("priority=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?");
        let value = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *shed.entry(priority.to_string()).or_default() += value as u64;
    }
    shed
}

#[cfg(test)]
mod tests {
    use super::{number, shed_by_priority};

    #[test]
    fn shed_counts_are_read_by_priority_from_the_metrics_text() {
        let text = "k2_shed_records_total{priority=\"tier3\",partition=\"0\"} 12\n\
                    k2_shed_records_total{priority=\"tier3\",partition=\"1\"} 3\n\
                    k2_shed_records_total{priority=\"tier2\",partition=\"0\"} 5\n\
                    k2_records_consumed_total 99\n";
        let shed = shed_by_priority(text);
        assert_eq!(shed.get("tier3"), Some(&15));
        assert_eq!(shed.get("tier2"), Some(&5));
        assert_eq!(shed.len(), 2);
    }

    #[test]
    fn numbers_stay_short_enough_for_their_column() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.4567), "0.46");
        assert_eq!(number(250.0), "250");
        assert_eq!(number(150_000.0), "150k");
        assert_eq!(number(4_500_000.0), "4.5M");
        assert_eq!(number(f64::INFINITY), "inf");
    }
}
