//! Durations as operators write them (`500ms`, `30s`, `5m`, `1h30m`, `7d`) and as the
//! command shows them.

use std::time::Duration;

/// Parse a duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`, `w`, or their long
/// forms), possibly several (`1h30m`). A bare number is refused: the unit is never guessed.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} has no unit: write e.g. {text}s or {text}ms"
        ));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}): write e.g. 500ms, 30s, 5m, 1h30m or 7d")
    })
}

/// A short human form: `750ms`, `12.5s`, `4m05s`, `3h20m`, `2d04h`, `7d` (the smaller unit
/// only when it is not zero).
pub(crate) fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    if secs < 60 {
        let tenths = d.as_millis() / 100;
        return if tenths.is_multiple_of(10) {
            format!("{secs}s")
        } else {
            format!("{}.{}s", tenths / 10, tenths % 10)
        };
    }
    let (major, unit, minor, minor_unit) = if secs < 3600 {
        (secs / 60, "m", secs % 60, "s")
    } else if secs < 86_400 {
        (secs / 3600, "h", secs % 3600 / 60, "m")
    } else {
        (secs / 86_400, "d", secs % 86_400 / 3600, "h")
    };
    if minor == 0 {
        format!("{major}{unit}")
    } else {
        format!("{major}{unit}{minor:02}{minor_unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_durations_parse() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse(" 2m "), Ok(Duration::from_secs(120)));
    }

    #[test]
    fn bare_numbers_and_nonsense_are_refused_with_examples() {
        let err = parse("30").unwrap_err();
        assert!(err.contains("no unit") && err.contains("30s"), "{err}");
        let err = parse("soon").unwrap_err();
        assert!(err.contains("500ms, 30s"), "{err}");
        assert!(parse("").is_err());
    }

    #[test]
    fn durations_show_short() {
        assert_eq!(show(Duration::from_millis(750)), "750ms");
        assert_eq!(show(Duration::from_millis(12_500)), "12.5s");
        assert_eq!(show(Duration::from_secs(30)), "30s");
        assert_eq!(show(Duration::from_secs(245)), "4m05s");
        assert_eq!(show(Duration::from_secs(12_000)), "3h20m");
        assert_eq!(show(Duration::from_secs(187_200)), "2d04h");
        assert_eq!(show(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(show(Duration::from_secs(120)), "2m");
    }
}
