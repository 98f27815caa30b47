"""The publication planner: one test per situation, no broker, no git."""

from __future__ import annotations

from setpoint.controller import planning
from setpoint.controller.planning import Adopt, Clear, Current, Publish, Retained
from setpoint.controller.rendering import Rendered, Target
from setpoint.proto.bundles import Bundle, SettingResource

G = Target("group", "kiosks")
D = Target("device", "kiosk-01")
NOW = 1_000_000
TTL = 1000


def bundle(
    target: Target = G, value: str = "a", version: int = 0, issued: int = 0, commit: str = "c1"
) -> Bundle:
    extra = {"group": "kiosks"} if target.kind == "device" else {}
    return Bundle(
        kind=target.kind,
        target=target.id,
        version=version,
        commit=commit,
        issued_at=issued,
        expires_at=issued + TTL if version else 0,
        resources=(SettingResource("s", "k", value),),
        **extra,
    )


def rendered(target: Target = G, value: str = "a", commit: str = "c1") -> Rendered:
    return Rendered(bundle(target, value, commit=commit), "main", "Alice")


def published(
    target: Target = G, value: str = "a", version: int = 1, issued: int = NOW - 10
) -> Current:
    return Current(bundle(target, value, version, issued), "Alice", "main")


def held(cur: Current) -> Retained:
    return Retained(cur.bundle, "digest")


def plan(**kw):  # type: ignore[no-untyped-def]
    kw.setdefault("current", {})
    kw.setdefault("retained", {})
    kw.setdefault("removals_allowed", True)
    return planning.plan(now=NOW, ttl=TTL, **kw)


def test_new_target_is_published_as_version_1() -> None:
    p = plan(desired={G: rendered()})
    [action] = p.actions
    assert isinstance(action, Publish) and action.reason == "change"
    assert action.bundle.version == 1
    assert (action.bundle.issued_at, action.bundle.expires_at) == (NOW, NOW + TTL)


def test_unchanged_target_is_not_republished() -> None:
    cur = published()
    assert not plan(desired={G: rendered()}, current={G: cur}, retained={G: held(cur)})


def test_unchanged_content_from_a_new_commit_is_not_republished() -> None:
    cur = published()
    assert not plan(desired={G: rendered(commit="c2")}, current={G: cur}, retained={G: held(cur)})


def test_changed_target_gets_the_next_version() -> None:
    cur = published(version=4)
    [action] = plan(
        desired={G: rendered(value="b")}, current={G: cur}, retained={G: held(cur)}
    ).actions
    assert isinstance(action, Publish) and action.bundle.version == 5


def test_version_floor_from_the_broker_when_state_was_lost() -> None:
    on_broker = published(version=7)
    [action] = plan(desired={G: rendered(value="b")}, retained={G: held(on_broker)}).actions
    assert isinstance(action, Publish) and action.bundle.version == 8


def test_state_lost_and_content_unchanged_adopts_without_publishing() -> None:
    on_broker = published(version=7)
    [action] = plan(desired={G: rendered()}, retained={G: held(on_broker)}).actions
    assert isinstance(action, Adopt) and action.bundle.version == 7


def test_version_floor_of_a_removed_target_is_remembered() -> None:
    [action] = plan(desired={G: rendered()}, floors={G: 12}).actions
    assert isinstance(action, Publish) and action.bundle.version == 13


def test_broker_lost_the_bundle_restores_same_version() -> None:
    cur = published(version=3)
    [action] = plan(desired={G: rendered()}, current={G: cur}).actions
    assert isinstance(action, Publish) and action.reason == "restore"
    assert action.bundle == cur.bundle


def test_broker_holds_an_older_version_restores() -> None:
    cur, old = published(version=3), published(version=2)
    [action] = plan(desired={G: rendered()}, current={G: cur}, retained={G: held(old)}).actions
    assert isinstance(action, Publish) and action.reason == "restore"
    assert action.bundle.version == 3


def test_broker_holds_something_unverifiable_restores() -> None:
    cur = published(version=3)
    bad = Retained(None, "x", "no signature by a trusted key")
    [action] = plan(desired={G: rendered()}, current={G: cur}, retained={G: bad}).actions
    assert isinstance(action, Publish) and action.reason == "restore"


def test_unverifiable_retained_gives_no_version_floor() -> None:
    bad = Retained(None, "x", "forged")
    [action] = plan(desired={G: rendered()}, retained={G: bad}).actions
    assert isinstance(action, Publish) and action.bundle.version == 1


def test_broker_holds_newer_other_content_gets_overtaken() -> None:
    cur, other = published(version=3), published(value="z", version=9)
    [action] = plan(desired={G: rendered()}, current={G: cur}, retained={G: held(other)}).actions
    assert isinstance(action, Publish) and action.reason == "change"
    assert action.bundle.version == 10


def test_refresh_at_half_life_keeps_version_and_content() -> None:
    cur = published(version=3, issued=NOW - TTL // 2)
    [action] = plan(desired={G: rendered()}, current={G: cur}, retained={G: held(cur)}).actions
    assert isinstance(action, Publish) and action.reason == "refresh"
    assert action.bundle.version == 3
    assert action.bundle.content_digest() == cur.content_digest
    assert action.bundle.issued_at == NOW and action.bundle.expires_at == NOW + TTL


def test_not_yet_half_life_is_not_refreshed() -> None:
    cur = published(version=3, issued=NOW - TTL // 2 + 1)
    assert not plan(desired={G: rendered()}, current={G: cur}, retained={G: held(cur)})


def test_next_refresh_is_the_earliest_half_life() -> None:
    a, b = published(G, issued=100), published(D, issued=50)
    assert planning.next_refresh({G: a, D: b}) == 50 + TTL // 2
    assert planning.next_refresh({}) is None


def test_removed_target_is_cleared() -> None:
    cur, dev = published(), published(D)
    [action] = plan(
        desired={D: rendered(D)}, current={G: cur, D: dev}, retained={G: held(cur), D: held(dev)}
    ).actions
    assert action == Clear(G, cur.bundle)


def test_removed_target_known_only_from_the_broker_is_cleared() -> None:
    on_broker = published()
    actions = plan(desired={D: rendered(D)}, retained={G: held(on_broker)}).actions
    assert Clear(G, on_broker.bundle) in actions


def test_foreign_retained_message_is_not_cleared() -> None:
    assert not plan(desired={}, retained={G: Retained(None, "x", "forged")}, allow_empty=True)


def test_removing_everything_is_refused() -> None:
    cur = published()
    p = plan(desired={}, current={G: cur}, retained={G: held(cur)})
    assert not p.actions
    assert p.refusal and "allow_empty: true" in p.refusal


def test_removing_everything_with_allow_empty() -> None:
    cur = published()
    p = plan(desired={}, current={G: cur}, retained={G: held(cur)}, allow_empty=True)
    assert p.actions == (Clear(G, cur.bundle),) and p.refusal is None


def test_broken_target_keeps_its_last_good_bundle() -> None:
    cur = published()
    p = plan(
        desired={},
        broken=frozenset({G}),
        current={G: cur},
        retained={G: held(cur)},
        removals_allowed=False,
    )
    assert not p.actions and p.refusal is None and G in p.kept


def test_broken_target_is_restored_if_the_broker_lost_it() -> None:
    cur = published()
    [action] = plan(
        desired={}, broken=frozenset({G}), current={G: cur}, removals_allowed=False
    ).actions
    assert isinstance(action, Publish) and action.reason == "restore"


def test_removals_not_allowed_keeps_everything() -> None:
    cur = published()
    assert not plan(desired={}, current={G: cur}, retained={G: held(cur)}, removals_allowed=False)


def test_unreadable_repository_keeps_and_refreshes() -> None:
    cur = published(issued=NOW - TTL)
    [action] = plan(desired=None, current={G: cur}, retained={G: held(cur)}).actions
    assert isinstance(action, Publish) and action.reason == "refresh"


def test_groups_publish_before_devices_and_devices_clear_before_groups() -> None:
    old_g, old_d = Target("group", "old"), Target("device", "old-d")
    current = {old_g: published(old_g), old_d: published(old_d)}
    p = plan(desired={D: rendered(D), G: rendered()}, current=current)
    kinds = [(type(a).__name__, a.target.kind) for a in p.actions]
    assert kinds == [
        ("Publish", "group"),
        ("Publish", "device"),
        ("Clear", "device"),
        ("Clear", "group"),
    ]


def test_force_push_to_older_content_still_goes_up() -> None:
    # v1 had "a", v2 has "b"; history rewritten back to "a": v3, never v1 again.
    cur = published(value="b", version=2)
    [action] = plan(
        desired={G: rendered(value="a")}, current={G: cur}, retained={G: held(cur)}
    ).actions
    assert isinstance(action, Publish) and action.bundle.version == 3


def test_unacknowledged_attempt_is_reused_for_the_same_content() -> None:
    tried = bundle(value="b", version=5, issued=NOW - 1)
    cur = published(version=4)
    [action] = plan(
        desired={G: rendered(value="b")},
        current={G: cur},
        retained={G: held(cur)},
        attempted={G: tried},
    ).actions
    assert isinstance(action, Publish) and action.bundle.version == 5


def test_unacknowledged_attempt_is_never_reused_for_other_content() -> None:
    # v5 with "b" may have reached devices before the broker went away; "c" must be v6.
    tried = bundle(value="b", version=5, issued=NOW - 1)
    cur = published(version=4)
    [action] = plan(
        desired={G: rendered(value="c")},
        current={G: cur},
        retained={G: held(cur)},
        attempted={G: tried},
    ).actions
    assert isinstance(action, Publish) and action.bundle.version == 6


def test_only_looks_at_the_targets_named() -> None:
    """Work proportional to what changed: the next round of a pass names the targets it
    acted on (and those a message changed); the others are not looked at."""
    cur = published(G)
    desired = {G: rendered(G, "b"), D: rendered(D)}
    full = plan(desired=desired, current={G: cur}, retained={G: held(cur)})
    assert {a.target for a in full.actions} == {G, D}
    part = plan(desired=desired, current={G: cur}, retained={G: held(cur)}, only={D})
    assert [a.target for a in part.actions] == [D]
    gone = Target("device", "gone")  # named but neither wanted nor known: nothing
    assert not plan(desired={}, current={}, retained={}, only={gone}).actions


def test_changed_targets_are_those_whose_content_or_brokenness_moved() -> None:
    other = Target("device", "kiosk-02")
    gone = Target("device", "kiosk-03")
    before = {G: rendered(), D: rendered(D), other: rendered(other), gone: rendered(gone)}
    after = {
        G: rendered(value="b", commit="c2"),  # new content
        D: rendered(D, commit="c2"),  # the same content from a newer commit
        other: rendered(other, commit="c2"),
    }
    assert planning.changed_targets(before, frozenset(), after, frozenset()) == {G, gone}
    # A target that broke (or healed) is looked at too; so is one on another branch.
    moved = {**after, other: Rendered(after[other].bundle, "canary", "Alice")}
    assert planning.changed_targets(after, frozenset({D}), moved, frozenset()) == {D, other}
    # What the plan would do for the unchanged ones is what it did before: nothing here.
    cur = {t: Current(r.bundle.with_version(1, NOW - 10, NOW - 10 + TTL), "Alice", "main")
           for t, r in before.items()}  # fmt: skip
    ret = {t: held(c) for t, c in cur.items()}
    full = plan(desired=after, current=cur, retained=ret)
    only = plan(desired=after, current=cur, retained=ret,
                only=planning.changed_targets(before, frozenset(), after, frozenset()))  # fmt: skip
    assert full.actions == only.actions
