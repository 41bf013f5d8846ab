"""The prefix cache: finished requests' KV slots, indexed by their tokens' keys in a radix tree.

A token-level radix tree as LightLLM's `radix_cache.py` (page size 1, as the KV pool): each
edge holds a run of keys and the KV slots of those positions. A finished request inserts its
keyed positions; a new one takes the longest matching prefix at admission, locks it (a count
per node, up to the root) so that it is never evicted while in use, and prefills the rest.
Eviction takes unlocked leaves, least recently used first, whenever the pool needs slots.

A key is a token id, except at an image token, where it is `(image_key, k)`: the image's
content identity (the embedding-cache key, md5 of the bytes plus every option that changes the
embedding, or a digest of precomputed embeddings) and the token's offset in the image. Two
different images never share KV; the same image at the same place after the same prefix does.
The tree never looks inside a key: anything hashable with `==` works.

The tree owns the slots it holds: the engine's `KVPool` counts them as neither used nor free
(`cached`; the unlocked part is `evictable` and counts as free for admission).
"""

from __future__ import annotations

import heapq
from typing import Hashable, Sequence

import numpy as np

Key = Hashable


class Node:
    __slots__ = ("parent", "children", "key", "slots", "ref", "stamp")

    def __init__(self, parent: Node | None, key: list, slots: np.ndarray, ref: int = 0, stamp: int = 0):
        self.parent = parent
        self.children: dict[Key, Node] = {}
        self.key = key  # the edge from the parent: one key per position
        self.slots = slots  # int32, one KV slot per position
        self.ref = ref  # running requests whose matched prefix runs through this node
        self.stamp = stamp  # last use (a counter, not a clock: deterministic)


def _common(edge: list, key: Sequence[Key], pos: int, limit: int) -> int:
    """How many of `edge`'s keys equal key[pos:limit] from the start."""
    m = min(len(edge), limit - pos)
    if edge[:m] == list(key[pos:pos + m]):  # the usual case: a whole edge at C speed
        return m
    n = 0
    while n < m and edge[n] == key[pos + n]:
        n += 1
    return n


class PrefixCache:
    """The radix tree over KV slots. `size`: tokens held; `locked`: those in nodes some running
    request uses; `evictable` = size - locked."""

    def __init__(self) -> None:
        self.root = Node(None, [], np.empty(0, dtype=np.int32), ref=1)
        self.size = 0
        self.locked = 0
        self._clock = 0
        # Counters for /metrics
        self.hit_tokens = 0  # prompt tokens served from the cache (summed over admitted requests)
        self.evicted_tokens = 0

    @property
    def evictable(self) -> int:
        return self.size - self.locked

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ----------------------------------------------------------------------------------

    def match(self, key: Sequence[Key], limit: int | None = None) -> tuple[Node, np.ndarray]:
        """The longest cached prefix of key[:limit]: its last node (split so that it ends
        exactly there) and its slots. Marks the path used (LRU)."""
        limit = len(key) if limit is None else min(limit, len(key))
        node, pos, parts = self.root, 0, []
        stamp = self._tick()
        while pos < limit:
            child = node.children.get(key[pos])
            if child is None:
                break
            n = _common(child.key, key, pos, limit)
            if n < len(child.key):
                child = self._split(child, n)
            child.stamp = stamp
            parts.append(child.slots)
            pos += n
            node = child
        slots = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
        return node, slots

    def insert(self, key: Sequence[Key], slots: np.ndarray) -> int:
        """Cache key[i] → slots[i]. Returns how many leading positions were cached already: the
        caller still owns slots[:that] where they differ from the tree's (duplicates to free);
        the tree owns the rest from now on."""
        if len(key) != len(slots):
            raise ValueError(f"{len(key)} keys but {len(slots)} slots")
        node, pos = self.root, 0
        stamp = self._tick()
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                leaf = Node(node, list(key[pos:]), np.asarray(slots[pos:], dtype=np.int32).copy(), stamp=stamp)
                node.children[leaf.key[0]] = leaf
                self.size += len(leaf.key)
                return pos
            n = _common(child.key, key, pos, len(key))
            if n < len(child.key):
                child = self._split(child, n)
            child.stamp = stamp
            pos += n
            node = child
        return pos

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child`'s edge after n keys; returns the new upper part (same locks)."""
        parent = child.parent
        mid = Node(parent, child.key[:n], child.slots[:n], ref=child.ref, stamp=child.stamp)
        child.key, child.slots, child.parent = child.key[n:], child.slots[n:], mid
        mid.children[child.key[0]] = child
        parent.children[mid.key[0]] = mid
        return mid

    # ----------------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        """A running request uses the path root → node: none of it is evicted until `unlock`."""
        while node is not self.root:
            if node.ref == 0:
                self.locked += len(node.key)
            node.ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            node.ref -= 1
            if node.ref == 0:
                self.locked -= len(node.key)
            elif node.ref < 0:
                raise RuntimeError("prefix-cache node unlocked more often than locked")
            node = node.parent

    def unlocked_on_path(self, node: Node) -> int:
        """Tokens that locking `node` would lock in addition to those locked now."""
        n = 0
        while node is not self.root:
            if node.ref == 0:
                n += len(node.key)
            node = node.parent
        return n

    def evict(self, n: int) -> np.ndarray:
        """Remove unlocked leaves, least recently used first, until at least `n` slots are freed
        (or nothing unlocked is left). Returns the freed slots, for the pool."""
        heap = [(leaf.stamp, id(leaf), leaf) for leaf in self._leaves() if leaf.ref == 0]
        heapq.heapify(heap)
        freed: list[np.ndarray] = []
        count = 0
        while count < n and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            freed.append(leaf.slots)
            count += len(leaf.key)
            if parent is not self.root and not parent.children and parent.ref == 0:
                heapq.heappush(heap, (parent.stamp, id(parent), parent))
        self.size -= count
        self.evicted_tokens += count
        return np.concatenate(freed) if freed else np.empty(0, dtype=np.int32)

    def _leaves(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                out.append(node)
        return out

    def check(self) -> None:
        """Consistency of the counts (tests)."""
        size = locked = 0
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            assert len(node.key) == len(node.slots) > 0
            assert node.ref >= sum(c.ref for c in node.children.values())
            size += len(node.key)
            locked += len(node.key) if node.ref else 0
            stack.extend(node.children.values())
        assert (size, locked) == (self.size, self.locked), ((size, locked), (self.size, self.locked))
