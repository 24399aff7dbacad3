//! `nestling generate resource <name> [field:type …] [--parent workspaces|projects]`: a feature
//! module in the shape of the others (model, DTOs, repository, cached service, controller with
//! its OpenAPI paths), a migration and a test file, rendered from the templates in
//! `templates/resource/` (minijinja); then the edits that wire it in, each made where this
//! repository has a marker for it (`@generate: <slot>`: the container, the routing table, the
//! OpenAPI document, the key registry, the TTL table in the code, the README and `.env.example`,
//! the test modules). Every Rust file written or edited is parsed (`syn`) before anything is
//! written; nothing is written when one does not parse, a marker is missing or a file exists with
//! other content. Run again with the same arguments, it changes nothing.

pub mod fields;

use std::path::{Path, PathBuf};

use minijinja::{context, Environment};
use serde::Serialize;

use fields::{pascal_case, Field};

/// Where a resource lives: its parent in the URL (`/api/<parent>/{id}/<name>`) and in
/// authorization (the parent's members may read and write it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Parent {
    Workspaces,
    Projects,
}

#[derive(Debug, Serialize)]
struct ParentContext {
    name: &'static str,
    singular: &'static str,
    #[serde(rename = "Type")]
    type_name: &'static str,
    id: &'static str,
    json: &'static str,
}

impl Parent {
    fn context(self) -> ParentContext {
        match self {
            Parent::Workspaces => ParentContext {
                name: "workspaces",
                singular: "workspace",
                type_name: "Workspace",
                id: "workspace_id",
                json: "workspaceId",
            },
            Parent::Projects => ParentContext {
                name: "projects",
                singular: "project",
                type_name: "Project",
                id: "project_id",
                json: "projectId",
            },
        }
    }
}

/// What `generate resource` was asked for.
pub struct Request {
    /// The repository to write into (the working directory for `cargo run -- g …`).
    pub root: PathBuf,
    /// Plural, snake_case: the table, the module, the URL segment (`labels`).
    pub name: String,
    /// Singular, snake_case (`label`); by default `name` without its plural ending.
    pub singular: Option<String>,
    pub parent: Parent,
    pub fields: Vec<String>,
    /// Seconds entries of this resource stay cached (its TTL-table row's default).
    pub ttl_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Field(#[from] fields::FieldError),
    #[error("{path}: {why}")]
    File { path: String, why: String },
    #[error("template {0}")]
    Template(#[from] minijinja::Error),
}

/// One line per file: created, edited (which slots), or unchanged.
pub type Report = Vec<String>;

/// A file to create.
struct NewFile {
    path: String,
    text: String,
}

/// Lines to insert above the marker `@generate: <slot>` of a file (indented as the marker is),
/// unless the file holds `sign` already (a run before made it).
struct Insertion {
    path: &'static str,
    slot: &'static str,
    text: String,
    sign: String,
}

pub fn resource(request: &Request) -> Result<Report, GenerateError> {
    let name = &request.name;
    if !fields::is_snake_case(name) {
        return Err(GenerateError::Invalid(format!(
            "the name must be plural and snake_case, like labels or task_notes: got {name:?}"
        )));
    }
    let singular = match &request.singular {
        Some(singular) => singular.clone(),
        None => singular_of(name)
            .ok_or_else(|| GenerateError::Invalid(format!("cannot tell the singular of {name:?}: give --singular")))?,
    };
    if !fields::is_snake_case(&singular) || singular == *name {
        return Err(GenerateError::Invalid(format!(
            "the singular must be snake_case and differ from the name: got {singular:?}"
        )));
    }
    if request.fields.is_empty() {
        return Err(GenerateError::Invalid(
            "give at least one field, e.g. name:string".into(),
        ));
    }
    let type_name = pascal_case(&singular);
    let fields: Vec<Field> = request
        .fields
        .iter()
        .map(|argument| fields::parse(argument, &type_name))
        .collect::<Result<_, _>>()?;
    let mut seen: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    seen.sort_unstable();
    if seen.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(GenerateError::Invalid("a field is given twice".into()));
    }
    let root = &request.root;
    let module_dir = format!("src/modules/{name}");
    for marker_file in ["src/container.rs", "src/modules/mod.rs"] {
        if !root.join(marker_file).exists() {
            return Err(GenerateError::Invalid(format!(
                "{} is not a nestling repository (no {marker_file}): run it from the repository's root",
                root.display()
            )));
        }
    }

    let parent = request.parent.context();
    let columns: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    let placeholders: Vec<String> = (1..=fields.len() + 1).map(|n| format!("${n}")).collect();
    let update_set: Vec<String> = fields
        .iter()
        .enumerate()
        .map(|(index, f)| format!("{} = ${}", f.name, index + 2))
        .collect();
    let mut checks = Vec::new();
    if fields.iter().any(|f| f.kind == "text") {
        checks.push("no_nul");
    }
    if fields.iter().any(|f| f.kind == "string") {
        checks.push("not_blank");
    }
    let mut uses = Vec::new();
    if fields.iter().any(|f| f.optional && f.kind != "int") {
        uses.push("nullable");
    }
    if fields.iter().any(|f| f.kind == "int") {
        uses.push("whole_number");
    }
    let enums: Vec<&Field> = fields.iter().filter(|f| f.enum_name.is_some()).collect();
    let trimmed: Vec<&Field> = fields.iter().filter(|f| f.trimmed).collect();
    let context = context! {
        name, singular, NAME => name.to_uppercase(), Type => type_name, Types => pascal_case(name),
        parent, fields, enums, trimmed, checks, uses,
        columns => columns.join(", "),
        insert_values => placeholders.join(", "),
        update_set => update_set.join(", "),
    };
    let mut env = Environment::new();
    env.set_keep_trailing_newline(true);
    for (template, source) in TEMPLATES {
        env.add_template(template, source)?;
    }
    let render = |template: &str| env.get_template(template).and_then(|t| t.render(&context));

    let mut files = Vec::new();
    for part in ["mod", "model", "dto", "repository", "service", "controller"] {
        files.push(NewFile {
            path: format!("{module_dir}/{part}.rs"),
            text: render(&format!("{part}.rs"))?,
        });
    }
    files.push(NewFile {
        path: migration_path(root, name)?,
        text: render("migration.sql")?,
    });
    files.push(NewFile {
        path: format!("tests/api/{name}.rs"),
        text: render("test.rs")?,
    });
    let insertions = insertions(request, &singular, &type_name, &parent);
    apply(root, files, insertions)
}

const TEMPLATES: [(&str, &str); 8] = [
    ("mod.rs", include_str!("../../templates/resource/mod.rs.j2")),
    ("model.rs", include_str!("../../templates/resource/model.rs.j2")),
    ("dto.rs", include_str!("../../templates/resource/dto.rs.j2")),
    (
        "repository.rs",
        include_str!("../../templates/resource/repository.rs.j2"),
    ),
    ("service.rs", include_str!("../../templates/resource/service.rs.j2")),
    (
        "controller.rs",
        include_str!("../../templates/resource/controller.rs.j2"),
    ),
    (
        "migration.sql",
        include_str!("../../templates/resource/migration.sql.j2"),
    ),
    ("test.rs", include_str!("../../templates/resource/test.rs.j2")),
];

/// `labels` → `label`, `categories` → `category`, `boxes` → `box`; `None` when it does not end
/// in `s`.
fn singular_of(plural: &str) -> Option<String> {
    if let Some(stem) = plural.strip_suffix("ies") {
        return Some(format!("{stem}y"));
    }
    for ending in ["sses", "xes", "ches", "shes", "zes"] {
        if let Some(stem) = plural.strip_suffix(ending) {
            return Some(format!("{stem}{}", &ending[..ending.len() - 2]));
        }
    }
    plural
        .strip_suffix('s')
        .filter(|stem| !stem.is_empty() && !stem.ends_with('s'))
        .map(str::to_owned)
}

/// The resource's migration: the one already generated for it, else the next number.
fn migration_path(root: &Path, name: &str) -> Result<String, GenerateError> {
    let dir = root.join("migrations");
    let entries = std::fs::read_dir(&dir).map_err(|err| GenerateError::File {
        path: "migrations".into(),
        why: err.to_string(),
    })?;
    let mut last = 0;
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.ends_with(&format!("_{name}.sql")) {
            return Ok(format!("migrations/{file}"));
        }
        if let Some(number) = file.split('_').next().and_then(|n| n.parse::<u32>().ok()) {
            last = last.max(number);
        }
    }
    Ok(format!("migrations/{:04}_{name}.sql", last + 1))
}

fn insertions(request: &Request, singular: &str, type_name: &str, parent: &ParentContext) -> Vec<Insertion> {
    let name = &request.name;
    let types = pascal_case(name);
    let env_name = format!("CACHE_TTL_{}", name.to_uppercase());
    let ttl = request.ttl_seconds;
    let lists = format!("{type_name}Lists");
    let insert = |path, slot, text: String| Insertion {
        path,
        slot,
        sign: text.lines().next().unwrap_or_default().trim().to_owned(),
        text,
    };
    vec![
        insert("src/modules/mod.rs", "modules", format!("pub mod {name};")),
        insert(
            "src/modules/mod.rs",
            match request.parent {
                Parent::Workspaces => "workspace-children",
                Parent::Projects => "project-children",
            },
            format!(".configure({name}::configure_in_{})", parent.singular),
        ),
        Insertion {
            sign: format!("web::scope(\"/api/{name}\")"),
            ..insert(
                "src/modules/mod.rs",
                "scopes",
                format!(
                    ".service(\n    web::scope(\"/api/{name}\")\n        .wrap(RateLimit::api())\n        .configure({name}::configure),\n)"
                ),
            )
        },
        insert(
            "src/container.rs",
            "imports",
            format!(
                "use crate::modules::{name}::repository::Pg{type_name}Repository;\nuse crate::modules::{name}::service::{types};"
            ),
        ),
        insert("src/container.rs", "components", format!("Pg{type_name}Repository, {types},")),
        insert("src/openapi.rs", "imports", format!("use crate::modules::{name};")),
        insert(
            "src/openapi.rs",
            "paths",
            format!(
                "{name}::controller::create_{singular}, {name}::controller::list_{name}, {name}::controller::get_{singular},\n{name}::controller::update_{singular}, {name}::controller::delete_{singular},"
            ),
        ),
        insert("src/openapi.rs", "tags", format!("(name = \"{name}\"),")),
        insert(
            "src/openapi.rs",
            "idempotent",
            format!("\"create_{singular}\",\n\"update_{singular}\","),
        ),
        insert("src/infra/redis/keys.rs", "namespaces", format!("{types},\n{lists},")),
        insert("src/infra/redis/keys.rs", "namespace-list", format!("Self::{types},\nSelf::{lists},")),
        insert(
            "src/infra/redis/keys.rs",
            "namespace-names",
            format!("Self::{types} => \"{name}\",\nSelf::{lists} => \"{}-lists\",", singular.replace('_', "-")),
        ),
        insert("src/infra/redis/keys.rs", "namespace-formats", format!("Self::{types} | Self::{lists} => 1,")),
        insert(
            "src/infra/redis/keys.rs",
            "namespace-ttls",
            format!("Self::{types} | Self::{lists} => table.{name},"),
        ),
        insert(
            "src/infra/redis/keys.rs",
            "key-builders",
            format!(
                "pub fn {singular}(&self, id: Uuid) -> CacheKey {{\n    self.plain(Namespace::{types}, id)\n}}\n\npub fn {singular}_list(&self, {pid}: Uuid) -> CacheKey {{\n    self.plain(Namespace::{lists}, {pid})\n}}\n",
                pid = parent.id
            ),
        ),
        insert("src/config.rs", "ttl-fields", format!("pub {name}: Duration,")),
        insert("src/config.rs", "ttl-entries", format!("(\"{env_name}\", {ttl}, self.{name}),")),
        insert("src/config.rs", "ttl-variables", format!("{name}: vars.secs(\"{env_name}\", {ttl})?,")),
        insert("README.md", "ttl-rows", format!("| `{env_name}` | {ttl} | {} |", name.replace('_', " "))),
        insert(".env.example", "ttl", format!("{env_name}={ttl}")),
        insert("tests/api/main.rs", "modules", format!("mod {name};")),
    ]
}

/// Writes what is missing, or nothing at all.
fn apply(root: &Path, files: Vec<NewFile>, insertions: Vec<Insertion>) -> Result<Report, GenerateError> {
    let mut report = Vec::new();
    let mut writes: Vec<(PathBuf, String)> = Vec::new();
    for mut file in files {
        file.text = formatted(root, &file.path, file.text);
        let path = root.join(&file.path);
        match std::fs::read_to_string(&path) {
            Ok(existing) if existing == file.text => report.push(format!("unchanged {}", file.path)),
            Ok(_) => {
                return Err(GenerateError::File {
                    path: file.path,
                    why: "exists with other content: not overwritten (nothing was written)".into(),
                })
            }
            Err(_) => {
                parse_if_rust(&file.path, &file.text)?;
                report.push(format!("created   {}", file.path));
                writes.push((path, file.text));
            }
        }
    }
    let mut edited: Vec<(&'static str, String, Vec<&'static str>)> = Vec::new();
    for insertion in insertions {
        let at = match edited.iter().position(|(path, _, _)| *path == insertion.path) {
            Some(at) => at,
            None => {
                let text = std::fs::read_to_string(root.join(insertion.path)).map_err(|err| GenerateError::File {
                    path: insertion.path.into(),
                    why: err.to_string(),
                })?;
                edited.push((insertion.path, text, Vec::new()));
                edited.len() - 1
            }
        };
        let (path, text, slots) = &mut edited[at];
        if text.contains(&insertion.sign) {
            continue;
        }
        *text = insert_at_marker(text, path, insertion.slot, &insertion.text)?;
        slots.push(insertion.slot);
    }
    for (path, text, slots) in edited {
        if slots.is_empty() {
            report.push(format!("unchanged {path}"));
            continue;
        }
        let text = formatted(root, path, text);
        parse_if_rust(path, &text)?;
        report.push(format!("edited    {path} ({})", slots.join(", ")));
        writes.push((root.join(path), text));
    }
    for (path, text) in &writes {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|err| GenerateError::File {
                path: dir.display().to_string(),
                why: err.to_string(),
            })?;
        }
        std::fs::write(path, text).map_err(|err| GenerateError::File {
            path: path.display().to_string(),
            why: err.to_string(),
        })?;
    }
    Ok(report)
}

/// `text` with `snippet` inserted above the line holding `@generate: <slot>`, indented as that
/// line is (whether it is there already, `apply` tells by the insertion's sign).
fn insert_at_marker(text: &str, path: &str, slot: &str, snippet: &str) -> Result<String, GenerateError> {
    let marker = format!("@generate: {slot}");
    let lines: Vec<&str> = text.split('\n').collect();
    let found: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim_end().ends_with(&marker) || lines[i].contains(&format!("{marker} ")))
        .collect();
    let [at] = found[..] else {
        return Err(GenerateError::File {
            path: path.into(),
            why: format!(
                "expected one `{marker}` marker, found {}: put it back where the README's \"Adding a feature module\" says",
                found.len()
            ),
        });
    };
    let indent: String = lines[at].chars().take_while(|c| c.is_whitespace()).collect();
    let indented: Vec<String> = snippet
        .split('\n')
        .map(|line| {
            if line.is_empty() {
                String::new()
            } else {
                format!("{indent}{line}")
            }
        })
        .collect();
    let mut out: Vec<String> = lines[..at].iter().map(|l| l.to_string()).collect();
    out.extend(indented);
    out.extend(lines[at..].iter().map(|l| l.to_string()));
    Ok(out.join("\n"))
}

fn parse_if_rust(path: &str, text: &str) -> Result<(), GenerateError> {
    if path.ends_with(".rs") {
        syn::parse_file(text).map_err(|err| GenerateError::File {
            path: path.into(),
            why: format!("would not parse as Rust ({err}): nothing was written"),
        })?;
    }
    Ok(())
}

/// A Rust file's text as `cargo fmt` would leave it (with the repository's `rustfmt.toml`), so
/// that the tree stays `cargo fmt --check` clean and a second run finds what the first wrote.
/// Other files, and everything when rustfmt is not installed, as they are.
fn formatted(root: &Path, path: &str, text: String) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if !path.ends_with(".rs") {
        return text;
    }
    let mut rustfmt = Command::new("rustfmt");
    rustfmt.args(["--edition", "2021", "--emit", "stdout", "--quiet"]);
    if root.join("rustfmt.toml").exists() {
        rustfmt.arg("--config-path").arg(root);
    }
    let child = rustfmt
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return text };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(text.as_bytes());
    }
    match child.wait_with_output() {
        Ok(output) if output.status.success() && !output.stdout.is_empty() => {
            String::from_utf8(output.stdout).unwrap_or(text)
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_become_singulars_or_ask_for_one() {
        for (plural, singular) in [
            ("labels", "label"),
            ("categories", "category"),
            ("boxes", "box"),
            ("task_notes", "task_note"),
        ] {
            assert_eq!(singular_of(plural).as_deref(), Some(singular), "{plural}");
        }
        assert_eq!(singular_of("data"), None);
    }

    /// A file in the way, or a marker missing: an error, and not one file written or edited.
    #[test]
    fn nothing_is_written_when_anything_is_in_the_way() {
        let root = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| std::fs::write(root.path().join(path), text).unwrap();
        let read = |path: &str| std::fs::read_to_string(root.path().join(path)).ok();
        write("taken.rs", "fn mine() {}\n");
        write("wired.rs", "// @generate: slot\n");
        let new_file = |path: &str| NewFile {
            path: path.into(),
            text: "fn generated() {}\n".into(),
        };
        let insertion = |slot| Insertion {
            path: "wired.rs",
            slot,
            text: "fn wired() {}".into(),
            sign: "fn wired()".into(),
        };
        let in_the_way = apply(
            root.path(),
            vec![new_file("fresh.rs"), new_file("taken.rs")],
            vec![insertion("slot")],
        );
        assert!(matches!(in_the_way, Err(GenerateError::File { ref path, .. }) if path == "taken.rs"));
        let no_marker = apply(root.path(), vec![new_file("fresh.rs")], vec![insertion("missing")]);
        assert!(no_marker.is_err());
        assert_eq!(read("fresh.rs"), None);
        assert_eq!(read("taken.rs").unwrap(), "fn mine() {}\n");
        assert_eq!(read("wired.rs").unwrap(), "// @generate: slot\n");
        // And when nothing is in the way, both are written.
        apply(root.path(), vec![new_file("fresh.rs")], vec![insertion("slot")]).unwrap();
        assert_eq!(read("wired.rs").unwrap(), "fn wired() {}\n// @generate: slot\n");
        // Once: a second run finds both there.
        let again = apply(root.path(), vec![new_file("fresh.rs")], vec![insertion("slot")]).unwrap();
        assert_eq!(again, ["unchanged fresh.rs", "unchanged wired.rs"]);
        assert_eq!(read("wired.rs").unwrap(), "fn wired() {}\n// @generate: slot\n");
    }

    #[test]
    fn a_snippet_goes_above_its_marker_indented_as_it_is() {
        let text = "fn a() {}\n    // @generate: slot\n";
        let once = insert_at_marker(text, "x.rs", "slot", "b,\nc,").unwrap();
        assert_eq!(once, "fn a() {}\n    b,\n    c,\n    // @generate: slot\n");
        assert!(insert_at_marker(text, "x.rs", "other", "b").is_err());
    }
}
