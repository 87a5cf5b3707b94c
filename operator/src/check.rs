//! `apipolicy-operator check`: offline validation of manifest files.

use std::path::{Path, PathBuf};

use apipolicy_api::manifest::check_manifest;

#[derive(Debug, Default)]
pub struct Report {
    /// One line per problem: `FILE:LINE:COLUMN: DOCUMENT: FIELD PATH: message` (the line and
    /// column of the field, or of its nearest enclosing one, when the text has them).
    pub lines: Vec<String>,
    pub files: usize,
    pub policies: usize,
    pub problems: usize,
}

/// Checks files, and the `*.yaml`/`*.yml` files of directories (recursively, sorted).
pub fn check_paths(paths: &[PathBuf]) -> Report {
    let mut report = Report::default();
    let mut files = Vec::new();
    for path in paths {
        collect(path, &mut files, &mut report);
    }
    for file in files {
        report.files += 1;
        // `-` is standard input: `helm template … | apipolicy-operator check -`.
        let (shown, text) = if file.as_os_str() == "-" {
            let mut text = String::new();
            ("-".to_owned(), std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map(|_| text))
        } else {
            (file.display().to_string(), std::fs::read_to_string(&file))
        };
        match text {
            Err(e) => {
                report.problems += 1;
                report.lines.push(format!("{shown}: cannot be read: {e}"));
            }
            Ok(text) => {
                let checked = check_manifest(&text);
                report.policies += checked.documents;
                report.problems += checked.problems.len();
                for p in checked.problems {
                    let at = p.position.map(|at| format!(":{}:{}", at.line, at.column)).unwrap_or_default();
                    report.lines.push(format!("{shown}{at}: {}: {}: {}", p.document, p.path, p.message));
                }
            }
        }
    }
    report
}

fn collect(path: &Path, files: &mut Vec<PathBuf>, report: &mut Report) {
    if path.as_os_str() == "-" {
        files.push(path.to_owned());
    } else if path.is_dir() {
        let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                report.problems += 1;
                report.lines.push(format!("{}: cannot be read: {e}", path.display()));
                return;
            }
        };
        entries.sort();
        for entry in entries {
            if entry.is_dir() || entry.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                collect(&entry, files, report);
            }
        }
    } else {
        files.push(path.to_owned());
    }
}
