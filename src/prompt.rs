//! Prompt -> condition. For class-conditional models the typed text is matched against the
//! class names, short names and keywords of the model's `classes.json`: an exact name first,
//! then word overlap, then fuzzy spelling. The match says how sure it is.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One class of a class-conditional model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassInfo {
    /// Class id fed to the model.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// Alternative names (`red_apple`).
    #[serde(default)]
    pub short_names: Vec<String>,
    /// Looser descriptive words.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// The emoji's code points (`1F34E`, `1F1EA-1F1EC`), for classes that are emoji: typing
    /// the emoji itself picks the class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unified: Option<String>,
}

/// The code points of the non-ASCII characters of `text` as upper-case hex joined by `-`,
/// without variation selectors (U+FE0F) or joiners' spacing: `"🍎"` -> `"1F34E"`.
fn code_points(text: &str) -> String {
    let cps: Vec<String> = text
        .trim()
        .chars()
        .filter(|&c| !c.is_ascii() && c != '\u{FE0F}' && c != '\u{FE0E}')
        .map(|c| format!("{:X}", c as u32))
        .collect();
    cps.join("-")
}

/// A prompt as shown back in messages: at most 60 characters, with the full length noted.
pub fn shown(prompt: &str) -> String {
    let n = prompt.chars().count();
    if n <= 60 {
        format!("{prompt:?}")
    } else {
        let head: String = prompt.chars().take(57).collect();
        format!("{:?} ({n} characters)", format!("{head}..."))
    }
}

/// How a prompt matched a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchKind {
    /// The prompt is the class name or a short name.
    Exact,
    /// Words in common.
    Words,
    /// Similar spelling only.
    Fuzzy,
}

/// The class chosen for a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMatch {
    /// Class id.
    pub id: u32,
    /// Class name.
    pub name: String,
    /// How it matched.
    pub kind: MatchKind,
    /// 0..=1, higher is better.
    pub score: f32,
}

impl ClassMatch {
    /// Whether the match is too loose to trust.
    pub fn is_weak(&self) -> bool {
        self.kind == MatchKind::Fuzzy || self.score < 0.5
    }
}

/// The classes of a model, ready for matching.
#[derive(Debug, Clone, Default)]
pub struct ClassIndex {
    classes: Vec<ClassInfo>,
    names: Vec<Vec<String>>,
    keywords: Vec<Vec<String>>,
}

const STOP_WORDS: &[&str] = &[
    "a", "an", "the", "of", "with", "and", "in", "on", "my", "some",
];

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP_WORDS.contains(w))
        .map(stem)
        .collect()
}

/// The words as typed: lower case, stop words dropped, no stemming.
fn raw_words(text: &str) -> String {
    let lower = text.to_lowercase();
    let kept: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP_WORDS.contains(w))
        .collect();
    kept.join(" ")
}

fn stem(w: &str) -> String {
    if w.len() > 4 && w.ends_with("es") && !w.ends_with("ses") {
        w[..w.len() - 2].to_string()
    } else if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") {
        w[..w.len() - 1].to_string()
    } else {
        w.to_string()
    }
}

/// Similarity of two words from their edit distance, 0..=1.
fn similarity(a: &str, b: &str) -> f32 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    let longest = a.len().max(b.len()).max(1);
    1.0 - prev[b.len()] as f32 / longest as f32
}

impl ClassIndex {
    /// Builds the index.
    pub fn new(classes: Vec<ClassInfo>) -> Self {
        let names = classes
            .iter()
            .map(|c| {
                let mut w = words(&c.name);
                for s in &c.short_names {
                    for x in words(s) {
                        if !w.contains(&x) {
                            w.push(x);
                        }
                    }
                }
                w
            })
            .collect();
        let keywords = classes
            .iter()
            .map(|c| c.keywords.iter().flat_map(|k| words(k)).collect())
            .collect();
        Self {
            classes,
            names,
            keywords,
        }
    }

    /// Reads `classes.json` (a list of [`ClassInfo`]).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read class names {}: {e}", path.display()))?;
        let classes: Vec<ClassInfo> = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid class names {}: {e}", path.display()))?;
        Ok(Self::new(classes))
    }

    /// All classes.
    pub fn classes(&self) -> &[ClassInfo] {
        &self.classes
    }

    /// The class with this id.
    pub fn get(&self, id: u32) -> Option<&ClassInfo> {
        self.classes.iter().find(|c| c.id == id)
    }

    /// The best class for a prompt, or `None` for a prompt with no usable words.
    pub fn best(&self, prompt: &str) -> Option<ClassMatch> {
        self.ranked(prompt, 1).into_iter().next()
    }

    /// Classes ranked for a prompt, best first (for the searchable picker).
    pub fn ranked(&self, prompt: &str, limit: usize) -> Vec<ClassMatch> {
        let typed = code_points(prompt);
        if !typed.is_empty() {
            let without_fe0f = |u: &str| {
                u.split('-')
                    .filter(|p| !p.eq_ignore_ascii_case("FE0F"))
                    .collect::<Vec<_>>()
                    .join("-")
            };
            if let Some(c) = self
                .classes
                .iter()
                .find(|c| c.unified.as_deref().map(without_fe0f).as_deref() == Some(typed.as_str()))
            {
                return vec![ClassMatch {
                    id: c.id,
                    name: c.name.clone(),
                    kind: MatchKind::Exact,
                    score: 1.0,
                }];
            }
        }
        let p = words(prompt);
        if p.is_empty() {
            return Vec::new();
        }
        let joined = p.join(" ");
        let raw = raw_words(prompt);
        let mut scored: Vec<(f32, MatchKind, usize)> = Vec::with_capacity(self.classes.len());
        for (i, c) in self.classes.iter().enumerate() {
            // Exact as typed beats exact after stemming ("house" is the short name of
            // "house building" and, stemmed, also the name "houses").
            let as_typed = |t: &str| raw_words(t) == raw;
            if as_typed(&c.name) || c.short_names.iter().any(|s| as_typed(s)) {
                scored.push((1.0, MatchKind::Exact, i));
                continue;
            }
            let exact = words(&c.name).join(" ") == joined
                || c.short_names.iter().any(|s| words(s).join(" ") == joined);
            if exact {
                scored.push((0.995, MatchKind::Exact, i));
                continue;
            }
            let names = &self.names[i];
            let common = p.iter().filter(|w| names.contains(w)).count();
            let union = names.len() + p.len() - common;
            let kw = p.iter().filter(|w| self.keywords[i].contains(w)).count();
            // Keywords (the emoji's category words) only break ties between names: with more
            // weight, "a cute cat" picked "crying cat face" (category "cat-face") over "cat face".
            let overlap =
                common as f32 / union.max(1) as f32 * 0.95 + 0.05 * kw as f32 / p.len() as f32;
            if common > 0 || kw > 0 {
                scored.push((overlap.min(0.99), MatchKind::Words, i));
                continue;
            }
            let fuzzy: f32 = p
                .iter()
                .map(|w| {
                    names
                        .iter()
                        .map(|n| similarity(w, n))
                        .fold(0.0f32, f32::max)
                })
                .sum::<f32>()
                / p.len() as f32;
            if fuzzy >= 0.5 {
                scored.push((fuzzy * 0.6, MatchKind::Fuzzy, i));
            }
        }
        // Exact matches, then matches sharing a word with a name, then the rest (keyword
        // and spelling matches) by score; on ties the shorter (more generic) name, then the
        // lower id.
        let tier = |kind: MatchKind, i: usize| match kind {
            MatchKind::Exact => 2,
            MatchKind::Words if p.iter().any(|w| self.names[i].contains(w)) => 1,
            _ => 0,
        };
        scored.sort_by(|a, b| {
            tier(b.1, b.2)
                .cmp(&tier(a.1, a.2))
                .then(b.0.total_cmp(&a.0))
                .then(
                    self.classes[a.2]
                        .name
                        .len()
                        .cmp(&self.classes[b.2].name.len()),
                )
                .then(self.classes[a.2].id.cmp(&self.classes[b.2].id))
        });
        scored
            .into_iter()
            .take(limit)
            .map(|(score, kind, i)| ClassMatch {
                id: self.classes[i].id,
                name: self.classes[i].name.clone(),
                kind,
                score,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> ClassIndex {
        let c = |id, name: &str, short: &[&str], kw: &[&str]| ClassInfo {
            id,
            name: name.into(),
            short_names: short.iter().map(|s| s.to_string()).collect(),
            keywords: kw.iter().map(|s| s.to_string()).collect(),
            unified: None,
        };
        ClassIndex::new(vec![
            c(0, "pineapple", &["pineapple"], &["food", "fruit"]),
            c(1, "red apple", &["apple"], &["food", "fruit"]),
            c(2, "green apple", &["green_apple"], &["food", "fruit"]),
            c(3, "cat face", &["cat"], &["animal", "mammal"]),
            c(4, "cat", &["cat2"], &["animal", "mammal"]),
            c(5, "grinning face", &["grinning"], &["smileys", "emotion"]),
        ])
    }

    #[test]
    fn exact_names_and_short_names_win() {
        let m = index().best("Red Apple").unwrap();
        assert_eq!((m.id, m.kind), (1, MatchKind::Exact));
        assert!(!m.is_weak());
        assert_eq!(index().best("green_apple").unwrap().id, 2);
        assert_eq!(index().best("apple").unwrap().id, 1);
    }

    #[test]
    fn word_overlap_prefers_the_closest_name() {
        let m = index().best("a cute cat").unwrap();
        assert_eq!(m.kind, MatchKind::Words);
        assert_eq!(m.id, 4);
        assert_eq!(index().best("smiling grinning face").unwrap().id, 5);
        assert_eq!(index().best("apples").unwrap().id, 1);
    }

    #[test]
    fn emoji_names_that_stem_alike_or_look_alike() {
        let c = |id, name: &str, short: &str| ClassInfo {
            id,
            name: name.into(),
            short_names: vec![short.into()],
            keywords: vec!["places".into()],
            unified: None,
        };
        let index = ClassIndex::new(vec![
            c(699, "evergreen tree", "evergreen_tree"),
            c(868, "houses", "house_buildings"),
            c(870, "house building", "house"),
            c(1033, "white medium star", "star"),
            c(1035, "shooting star", "stars"),
            c(1555, "keycap 3", "three"),
        ]);
        // Exact as typed beats exact after stemming.
        assert_eq!(index.best("house").unwrap().id, 870);
        assert_eq!(index.best("houses").unwrap().id, 868);
        assert_eq!(index.best("star").unwrap().id, 1033);
        // A shared word beats a close spelling ("tree" / "three").
        let m = index.best("tree").unwrap();
        assert_eq!((m.id, m.kind), (699, MatchKind::Words));
    }

    #[test]
    fn category_words_do_not_outweigh_the_name() {
        // Emoji data: "cat face" is an animal, "crying cat face" is in the "cat-face" group.
        let c = |id, name: &str, short: &str, kw: &[&str]| ClassInfo {
            id,
            name: name.into(),
            short_names: vec![short.into()],
            keywords: kw.iter().map(|s| s.to_string()).collect(),
            unified: None,
        };
        let index = ClassIndex::new(vec![
            c(
                90,
                "crying cat face",
                "crying_cat_face",
                &["cat", "emotion", "face", "smileys"],
            ),
            c(560, "cat face", "cat", &["animal", "mammal", "nature"]),
        ]);
        assert_eq!(index.best("a cute cat").map(|m| m.id), Some(560));
    }

    #[test]
    fn typing_the_emoji_itself_picks_its_class() {
        let c = |id, name: &str, unified: &str| ClassInfo {
            id,
            name: name.into(),
            short_names: vec![],
            keywords: vec![],
            unified: Some(unified.into()),
        };
        let index = ClassIndex::new(vec![
            c(723, "red apple", "1F34E"),
            c(1719, "egypt flag", "1F1EA-1F1EC"),
            c(1000, "red heart", "2764-FE0F"),
        ]);
        let m = index.best("🍎").expect("a match");
        assert_eq!((m.id, m.kind), (723, MatchKind::Exact));
        assert_eq!(index.best(" 🇪🇬 ").map(|m| m.id), Some(1719));
        assert_eq!(index.best("❤️").map(|m| m.id), Some(1000));
        assert_eq!(index.best("❤").map(|m| m.id), Some(1000));
        assert!(index.best("🐱").is_none());
    }

    #[test]
    fn long_prompts_are_shortened_when_shown() {
        assert_eq!(shown("red apple"), "\"red apple\"");
        let long = "cat ".repeat(5000);
        let s = shown(&long);
        assert!(s.len() < 100 && s.contains("20000 characters"), "{s}");
    }

    #[test]
    fn keywords_give_weak_matches() {
        let m = index().best("some fruit").unwrap();
        assert!(m.is_weak(), "{m:?}");
        assert!([0, 1, 2].contains(&m.id));
    }

    #[test]
    fn misspellings_match_fuzzily_and_weakly() {
        let m = index().best("pinapple").unwrap();
        assert_eq!((m.id, m.kind), (0, MatchKind::Fuzzy));
        assert!(m.is_weak());
    }

    #[test]
    fn odd_prompts_do_not_match() {
        assert!(index().best("").is_none());
        assert!(index().best("  !!! ").is_none());
        assert!(index().best("xqzt").is_none());
        // Very long and non-ASCII prompts are fine.
        let long = "cat ".repeat(5000);
        assert_eq!(index().best(&long).unwrap().id, 4);
        assert!(index().best("猫 🐱").is_none());
    }
}
