//! The in-memory index of a mounted dataset: its objects as a tree of
//! directories and files, built from one paginated listing.
//!
//! Datasets are immutable, so the index never goes stale: every lookup,
//! getattr and readdir below a dataset is answered from it without a round
//! trip. Node numbers follow the listing's order (storaged lists in path
//! order), so they are the same at every mount of the same dataset; each
//! directory keeps its children sorted by name, which makes lookups a
//! binary search and readdir offsets stable across calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A node of a dataset's tree: node 0 is the dataset's root directory.
pub type NodeId = u32;

/// The root directory of every tree.
pub const TREE_ROOT: NodeId = 0;

#[derive(Debug)]
pub enum NodeKind {
    /// Children sorted by name.
    Dir {
        children: Vec<NodeId>,
    },
    File {
        size: u64,
        crc32: u32,
    },
}

#[derive(Debug)]
pub struct Node {
    pub name: Box<str>,
    pub parent: NodeId,
    pub kind: NodeKind,
}

/// Why a listing does not make a tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error(
        "the dataset holds more than {max} objects and directories, the mount's index limit (--index-entries-max)"
    )]
    TooLarge { max: usize },
    #[error("object {path:?} is both a file and a directory in the listing")]
    Conflict { path: String },
    #[error("object path {path:?} has an empty component")]
    BadPath { path: String },
}

/// One dataset's objects as directories and files.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    files: u64,
    /// One bit per node: the file's last fetch at open went unused, so the
    /// kernel's page cache most likely holds it (see
    /// [`Tree::fetch_at_open`]).
    cached: Box<[AtomicU64]>,
}

impl Tree {
    /// Builds the tree of `objects` (path, size, CRC-32), at most
    /// `entries_max` nodes.
    pub fn build(
        objects: impl IntoIterator<Item = (String, u64, u32)>,
        entries_max: usize,
    ) -> Result<Tree, TreeError> {
        let mut nodes = vec![Node {
            name: "".into(),
            parent: TREE_ROOT,
            kind: NodeKind::Dir {
                children: Vec::new(),
            },
        }];
        // Directories by (parent, name); files need no map: storaged lists
        // each path once.
        let mut dirs: HashMap<(NodeId, Box<str>), NodeId> = HashMap::new();
        let mut files = 0;
        for (path, size, crc32) in objects {
            let mut parent = TREE_ROOT;
            let mut parts = path.split('/').peekable();
            while let Some(part) = parts.next() {
                if part.is_empty() {
                    return Err(TreeError::BadPath { path });
                }
                if nodes.len() >= entries_max {
                    return Err(TreeError::TooLarge { max: entries_max });
                }
                let last = parts.peek().is_none();
                let key = (parent, Box::<str>::from(part));
                if last {
                    if dirs.contains_key(&key) {
                        return Err(TreeError::Conflict { path });
                    }
                    push(&mut nodes, parent, part, NodeKind::File { size, crc32 });
                    files += 1;
                } else {
                    parent = match dirs.get(&key) {
                        Some(&id) => id,
                        None => {
                            let kind = NodeKind::Dir {
                                children: Vec::new(),
                            };
                            let id = push(&mut nodes, parent, part, kind);
                            dirs.insert(key, id);
                            id
                        }
                    };
                }
            }
        }
        // Children in name order; a file and a directory of the same name
        // in one directory would now be neighbours.
        let cached = (0..nodes.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        let mut tree = Tree {
            nodes,
            files,
            cached,
        };
        for i in 0..tree.nodes.len() {
            let mut children = match &mut tree.nodes[i].kind {
                NodeKind::Dir { children } => std::mem::take(children),
                NodeKind::File { .. } => continue,
            };
            children.sort_by(|a, b| tree.name(*a).cmp(tree.name(*b)));
            if let Some(w) = children
                .windows(2)
                .find(|w| tree.name(w[0]) == tree.name(w[1]))
            {
                return Err(TreeError::Conflict {
                    path: tree.path(w[0]),
                });
            }
            if let NodeKind::Dir { children: c } = &mut tree.nodes[i].kind {
                *c = children;
            }
        }
        Ok(tree)
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    fn name(&self, id: NodeId) -> &str {
        &self.nodes[id as usize].name
    }

    /// Whether an open of `id` should fetch the file whole at once:
    /// unless the last such fetch went unused (the file was closed without
    /// a read reaching the mount, so the kernel's page cache held it).
    pub fn fetch_at_open(&self, id: NodeId) -> bool {
        let (word, bit) = self.cached_bit(id);
        word.is_some_and(|w| w.load(Ordering::Relaxed) & bit == 0)
    }

    /// Records how the fetch at an open of `id` went: `used` by a read
    /// (the file is not in the page cache) or not (it is, most likely).
    /// A read of a file whose open did not fetch counts as used: the page
    /// cache no longer holds it, so its next open fetches again.
    pub fn note_fetch_at_open(&self, id: NodeId, used: bool) {
        let (word, bit) = self.cached_bit(id);
        if let Some(word) = word {
            if used {
                word.fetch_and(!bit, Ordering::Relaxed);
            } else {
                word.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    fn cached_bit(&self, id: NodeId) -> (Option<&AtomicU64>, u64) {
        (self.cached.get(id as usize / 64), 1u64 << (id % 64))
    }

    /// Nodes in all (directories and files, the root included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Files in all.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// The child of directory `dir` named `name`.
    pub fn child(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        let children = self.children(dir)?;
        children
            .binary_search_by(|c| self.name(*c).cmp(name))
            .ok()
            .map(|i| children[i])
    }

    /// The children of `dir` in name order (`None` for a file).
    pub fn children(&self, dir: NodeId) -> Option<&[NodeId]> {
        match &self.node(dir)?.kind {
            NodeKind::Dir { children } => Some(children),
            NodeKind::File { .. } => None,
        }
    }

    /// The object path of `id` in its dataset ("a/b/c").
    pub fn path(&self, id: NodeId) -> String {
        let mut parts = Vec::new();
        let mut at = id;
        while at != TREE_ROOT {
            let n = &self.nodes[at as usize];
            parts.push(&*n.name);
            at = n.parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

fn push(nodes: &mut Vec<Node>, parent: NodeId, name: &str, kind: NodeKind) -> NodeId {
    let id = nodes.len() as NodeId;
    nodes.push(Node {
        name: name.into(),
        parent,
        kind,
    });
    if let NodeKind::Dir { children } = &mut nodes[parent as usize].kind {
        children.push(id);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_at_open_stops_while_the_page_cache_holds_the_file() {
        // Guards against fetching at every open a file the page cache
        // holds (its fetch goes unused), and against never fetching again
        // once the page cache has let it go (a read reaches the mount).
        let tree = Tree::build(objects(&["a/x", "a/y", "z"]), 100).unwrap();
        let ids: Vec<NodeId> = (0..tree.len() as NodeId).collect();
        assert!(ids.iter().all(|&id| tree.fetch_at_open(id)));
        tree.note_fetch_at_open(2, false);
        assert!(!tree.fetch_at_open(2));
        assert!(
            ids.iter()
                .filter(|&&id| id != 2)
                .all(|&id| tree.fetch_at_open(id))
        );
        tree.note_fetch_at_open(2, true);
        assert!(tree.fetch_at_open(2));
        assert!(!tree.fetch_at_open(64 * 1000), "past the nodes");
        tree.note_fetch_at_open(64 * 1000, false);
    }

    fn objects(paths: &[&str]) -> Vec<(String, u64, u32)> {
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.to_string(), i as u64, i as u32))
            .collect()
    }

    #[test]
    fn builds_directories_and_finds_children() {
        // Listing order puts "a.txt" before "a/x" ('.' < '/') and "a0"
        // after it: children still come out in name order.
        let t = Tree::build(objects(&["a.txt", "a/b/c", "a/x", "a0", "z"]), 100).unwrap();
        let root: Vec<&str> = t
            .children(TREE_ROOT)
            .unwrap()
            .iter()
            .map(|c| t.name(*c))
            .collect();
        assert_eq!(root, ["a", "a.txt", "a0", "z"]);
        let a = t.child(TREE_ROOT, "a").unwrap();
        let b = t.child(a, "b").unwrap();
        let c = t.child(b, "c").unwrap();
        assert_eq!(t.path(c), "a/b/c");
        assert!(matches!(
            t.node(c).unwrap().kind,
            NodeKind::File { size: 1, crc32: 1 }
        ));
        assert_eq!(t.child(a, "nope"), None);
        assert_eq!(t.child(c, "x"), None, "a file has no children");
        assert_eq!(t.files(), 5);
        assert_eq!(t.len(), 8);
    }

    #[test]
    fn node_numbers_follow_the_listing() {
        let a = Tree::build(objects(&["d/1", "d/2", "e"]), 100).unwrap();
        let b = Tree::build(objects(&["d/1", "d/2", "e"]), 100).unwrap();
        let d = a.child(TREE_ROOT, "d").unwrap();
        assert_eq!(d, b.child(TREE_ROOT, "d").unwrap());
        assert_eq!(a.child(d, "2"), b.child(d, "2"));
    }

    #[test]
    fn refuses_conflicts_bad_paths_and_too_many_entries() {
        // Guards against a listing that names a path as file and directory.
        assert_eq!(
            Tree::build(objects(&["a/b", "a"]), 100).unwrap_err(),
            TreeError::Conflict { path: "a".into() }
        );
        assert!(matches!(
            Tree::build(objects(&["a", "a/b"]), 100).unwrap_err(),
            TreeError::Conflict { .. }
        ));
        assert!(matches!(
            Tree::build(objects(&["a//b"]), 100).unwrap_err(),
            TreeError::BadPath { .. }
        ));
        assert_eq!(
            Tree::build(objects(&["a", "b", "c"]), 3).unwrap_err(),
            TreeError::TooLarge { max: 3 }
        );
    }

    #[test]
    fn empty_dataset_is_an_empty_root() {
        let t = Tree::build(Vec::new(), 10).unwrap();
        assert_eq!(t.children(TREE_ROOT).unwrap().len(), 0);
        assert_eq!(t.path(TREE_ROOT), "");
    }
}
