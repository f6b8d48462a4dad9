//! Profiles outside the process (Redis): a profile whose item, category and brand indices are
//! replaced by names.
//!
//! Indices are this node's interning order (first seen, first numbered), which differs between
//! nodes and between a replay and the original run. A stored profile therefore carries its own
//! small name tables: `profile` holds positions in `items`, `categories` and `brands` instead of
//! global indices, so that any node reads the same profile whatever its interners hold, and each
//! name is stored once however often the profile refers to it.
//!
//! ## Format
//! `KP1` followed by the postcard encoding of [`StoredProfile`]. A reader that finds another
//! prefix treats the value as absent (and the writer overwrites it), so a later format can change
//! the layout without a migration.

use serde::{Deserialize, Serialize};

use crate::decay::TopList;
use crate::profile::Profile;
use crate::state::State;

const MAGIC: &[u8; 3] = b"KP1";

/// What a profile key holds outside the process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StoredProfile {
    Profile(Box<PortableProfile>),
    /// An anonymous profile that was merged into a known user's (`u:` key): readers follow it.
    MergedInto(Box<str>),
}

/// A profile with node-independent references (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortableProfile {
    /// The profile, its item, category and brand references being positions in the tables below.
    pub profile: Profile,
    pub items: Vec<Box<str>>,
    pub categories: Vec<Box<str>>,
    pub brands: Vec<Box<str>>,
}

impl StoredProfile {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_extend(self, MAGIC.to_vec()).expect("a profile always serializes")
    }

    /// `None` for a value in another format (or not a profile at all).
    pub fn decode(bytes: &[u8]) -> Option<StoredProfile> {
        postcard::from_bytes(bytes.strip_prefix(MAGIC)?).ok()
    }
}

/// Renumbers the global indices one profile uses into 0, 1, 2 … (a profile refers to a few
/// dozen items at most, so a linear search beats a hash map).
#[derive(Default)]
struct LocalTable {
    globals: Vec<u32>,
}

impl LocalTable {
    fn local(&mut self, global: u32) -> u32 {
        match self.globals.iter().position(|&g| g == global) {
            Some(i) => i as u32,
            None => {
                self.globals.push(global);
                (self.globals.len() - 1) as u32
            }
        }
    }

    fn names<'a>(&self, name: impl Fn(u32) -> &'a str) -> Vec<Box<str>> {
        self.globals.iter().map(|&g| name(g).into()).collect()
    }
}

fn remap_list(list: &TopList, mut map: impl FnMut(u32) -> u32) -> TopList {
    TopList {
        ref_ts: list.ref_ts,
        entries: list.entries.iter().map(|&(k, w)| (map(k), w)).collect(),
    }
}

/// `p` with every item reference passed through `item`, every category through `category` and
/// every brand through `brand`.
fn remap(
    p: &Profile,
    mut item: impl FnMut(u32) -> u32,
    category: impl FnMut(u32) -> u32,
    brand: impl FnMut(u32) -> u32,
) -> Profile {
    let mut out = p.clone();
    for i in out.recent.iter_mut() {
        i.item = item(i.item);
    }
    for line in out.cart.iter_mut() {
        line.0 = item(line.0);
    }
    for i in out.purchased.iter_mut() {
        *i = item(*i);
    }
    out.categories = remap_list(&p.categories, category);
    out.brands = remap_list(&p.brands, brand);
    out
}

impl PortableProfile {
    /// The portable form of `p`, a profile of `state`.
    pub fn export(p: &Profile, state: &State) -> PortableProfile {
        let (mut items, mut categories, mut brands) = Default::default();
        let profile = remap(
            p,
            |i| LocalTable::local(&mut items, i),
            |c| LocalTable::local(&mut categories, c),
            |b| LocalTable::local(&mut brands, b),
        );
        PortableProfile {
            profile,
            items: items.names(|i| state.items.name(i)),
            categories: categories.names(|c| state.categories.name(c)),
            brands: brands.names(|b| state.brands.name(b)),
        }
    }

    /// The profile in `state`'s numbering, interning names `state` has not seen yet. `None` when
    /// the stored profile refers past its own tables (a corrupt value).
    pub fn import(&self, state: &mut State) -> Option<Profile> {
        if !self.in_range() {
            return None;
        }
        let items = self.items.iter().map(|n| state.intern_item(n)).collect();
        let categories = self
            .categories
            .iter()
            .map(|n| state.categories.intern(n))
            .collect();
        let brands = self.brands.iter().map(|n| state.brands.intern(n)).collect();
        Some(self.renumbered(items, categories, brands))
    }

    /// The profile in `state`'s numbering, without changing `state`: `None` when it names an
    /// item, category or brand `state` does not know yet (then [`import`](Self::import) it), or
    /// is corrupt.
    pub fn import_known(&self, state: &State) -> Option<Profile> {
        if !self.in_range() {
            return None;
        }
        let items: Option<_> = self.items.iter().map(|n| state.items.get(n)).collect();
        let categories: Option<_> = self
            .categories
            .iter()
            .map(|n| state.categories.get(n))
            .collect();
        let brands: Option<_> = self.brands.iter().map(|n| state.brands.get(n)).collect();
        Some(self.renumbered(items?, categories?, brands?))
    }

    /// The profile with its own tables' positions replaced by `items`, `categories` and
    /// `brands` (a node's numbers, by position).
    fn renumbered(&self, items: Vec<u32>, categories: Vec<u32>, brands: Vec<u32>) -> Profile {
        remap(
            &self.profile,
            |i| items[i as usize],
            |c| categories[c as usize],
            |b| brands[b as usize],
        )
    }

    /// Whether every reference of the profile is within its own tables.
    fn in_range(&self) -> bool {
        let p = &self.profile;
        let items = self.items.len() as u32;
        p.recent.iter().all(|i| i.item < items)
            && p.cart.iter().all(|l| l.0 < items)
            && p.purchased.iter().all(|&i| i < items)
            && p.categories
                .entries
                .iter()
                .all(|e| (e.0 as usize) < self.categories.len())
            && p.brands
                .entries
                .iter()
                .all(|e| (e.0 as usize) < self.brands.len())
    }
}

/// What Redis holds about one person (`RedisProfiles::read_person`): the profiles of their keys,
/// which a processor group links instead of merging.
#[derive(Debug, Default)]
pub struct Person {
    /// Every profile key read (whether it held a profile or not): what an answer built from
    /// them depends on.
    pub keys: Vec<String>,
    /// The user key the person is known as, if any.
    pub user: Option<String>,
    /// The profiles found, by key, in the order read.
    pub profiles: Vec<(String, PortableProfile)>,
}

/// One person's profile from the profiles of their keys (a processor group links identities
/// instead of merging them, see `GroupView` in the state): the user key's profile, when there is
/// one, with every other merged into it, in key order.
pub fn merge_person(
    mut profiles: Vec<(String, Profile)>,
    user: Option<&str>,
    cfg: &crate::StateConfig,
) -> Option<Profile> {
    profiles.sort_by(|a, b| {
        let first = |k: &str| Some(k) != user;
        first(&a.0).cmp(&first(&b.0)).then_with(|| a.0.cmp(&b.0))
    });
    let mut profiles = profiles.into_iter();
    let (_, mut person) = profiles.next()?;
    for (_, other) in profiles {
        person.merge_from(&other, cfg);
    }
    Some(person)
}

impl State {
    /// What the profile key `key` should hold outside the process: its profile, where it was
    /// merged, or `None` when this state knows nothing of it.
    pub fn stored_profile(&self, key: &str) -> Option<StoredProfile> {
        if let Some(p) = self.users.get(key) {
            return Some(StoredProfile::Profile(Box::new(PortableProfile::export(
                p, self,
            ))));
        }
        self.links
            .get(key)
            .map(|target| StoredProfile::MergedInto(target.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LogPosition;
    use crate::StateConfig;
    use kairos_types::{normalize, LogEntry, RequestContext};

    /// An event as ingest would log it.
    fn event(json: serde_json::Value) -> LogEntry {
        let req = RequestContext {
            received_at: 0,
            sent_at: None,
            call: None,
            context: Default::default(),
            fallback_message_id: "fallback".into(),
        };
        LogEntry::Event(normalize(&json, &req).expect("a valid event"))
    }

    fn apply_all(state: &mut State, entries: &[LogEntry]) {
        for (n, e) in entries.iter().enumerate() {
            let pos = LogPosition {
                partition: 0,
                offset: n as u64,
                seq: n as u64 + 1,
            };
            state.apply(pos, e);
        }
    }

    fn view(user: &str, item: &str, category: &str, ts: i64) -> LogEntry {
        event(serde_json::json!({
            "type": "track", "event": "product_view", "userId": user, "anonymousId": format!("anon-{user}"),
            "messageId": format!("{user}-{item}-{ts}"), "timestamp": ts,
            "properties": {"product_id": item, "category": category, "brand": format!("brand-{category}")}
        }))
    }

    #[test]
    fn a_profile_reads_back_the_same_on_a_node_that_numbered_items_differently() {
        let events = [
            view("alice", "p1", "shoes", 1_000),
            view("bob", "p9", "hats", 2_000),
            view("alice", "p2", "socks", 3_000),
            event(serde_json::json!({
                "type": "track", "event": "add_to_cart", "userId": "alice", "messageId": "cart-1",
                "timestamp": 4_000, "properties": {"product_id": "p2", "quantity": 2}
            })),
            view("alice", "p1", "shoes", 5_000),
        ];
        let mut writer = State::new(StateConfig::default());
        apply_all(&mut writer, &events);
        let stored = writer
            .stored_profile("u:alice")
            .expect("alice has a profile");
        let bytes = stored.encode();
        let Some(StoredProfile::Profile(portable)) = StoredProfile::decode(&bytes) else {
            panic!("decodes back to a profile");
        };
        assert_eq!(
            portable.items.len(),
            2,
            "each item once: {:?}",
            portable.items
        );

        // A reader that saw other items first numbers alice's items differently.
        let mut reader = State::new(StateConfig::default());
        apply_all(
            &mut reader,
            &[view("carol", "p2", "socks", 1), view("dave", "p7", "x", 2)],
        );
        assert_ne!(reader.items.get("p2"), writer.items.get("p2"));
        let imported = portable.import(&mut reader).expect("in range");
        let original = writer.users.get("u:alice").expect("alice");
        let names = |s: &State, p: &Profile| -> Vec<String> {
            p.recent
                .iter()
                .map(|i| s.items.name(i.item).to_owned())
                .collect()
        };
        assert_eq!(names(&reader, &imported), names(&writer, original));
        assert_eq!(imported.counters, original.counters);
        assert_eq!(imported.cart.len(), 1);
        assert_eq!(reader.items.name(imported.cart[0].0), "p2");
        let cats = |s: &State, p: &Profile| -> Vec<(String, f32)> {
            p.categories
                .entries
                .iter()
                .map(|&(c, w)| (s.categories.name(c).to_owned(), w))
                .collect()
        };
        assert_eq!(cats(&reader, &imported), cats(&writer, original));
        // And the round trip through the reader gives the same portable profile.
        assert_eq!(PortableProfile::export(&imported, &reader), *portable);
    }

    #[test]
    fn a_merged_anonymous_profile_is_stored_as_a_link() {
        let mut state = State::new(StateConfig::default());
        apply_all(
            &mut state,
            &[
                event(
                    serde_json::json!({"type": "track", "event": "product_view", "anonymousId": "dev-1",
                    "messageId": "m1", "timestamp": 1, "properties": {"product_id": "p1"}}),
                ),
                event(
                    serde_json::json!({"type": "identify", "userId": "zoe", "anonymousId": "dev-1",
                    "messageId": "m2", "timestamp": 2}),
                ),
            ],
        );
        assert_eq!(
            state.stored_profile("a:dev-1"),
            Some(StoredProfile::MergedInto("u:zoe".into()))
        );
        assert!(matches!(
            state.stored_profile("u:zoe"),
            Some(StoredProfile::Profile(_))
        ));
        assert_eq!(state.stored_profile("u:nobody"), None);
    }

    #[test]
    fn values_in_another_format_read_as_absent() {
        assert_eq!(StoredProfile::decode(b""), None);
        assert_eq!(StoredProfile::decode(b"KP0\x00"), None);
        assert_eq!(StoredProfile::decode(b"KP1\xff\xff\xff"), None);
    }

    #[test]
    fn a_profile_pointing_past_its_tables_is_refused() {
        let mut p = Profile::default();
        p.purchased.push_back(3);
        let portable = PortableProfile {
            profile: p,
            items: vec!["only-one".into()],
            categories: vec![],
            brands: vec![],
        };
        assert_eq!(
            portable.import(&mut State::new(StateConfig::default())),
            None
        );
    }
}
