-- Applied on every cold start; every statement is idempotent. Times are integer
-- milliseconds since the epoch (compared for TTLs and leases), JSON values are stored
-- as JSON.stringify text and parsed on read.

CREATE TABLE IF NOT EXISTS schema_version (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  version INTEGER NOT NULL
) STRICT;

-- rev grows on every change in the room (triggers below): instances sharing the
-- database poll it to wake their waiters on writes made elsewhere.
-- Tokens are stored only as SHA-256 hashes (hex); a room made before tokens has none.
CREATE TABLE IF NOT EXISTS rooms (
  id TEXT PRIMARY KEY,
  created_at INTEGER NOT NULL,
  meta TEXT NOT NULL,
  rev INTEGER NOT NULL DEFAULT 0,
  locked INTEGER NOT NULL DEFAULT 0,
  token_hash TEXT,
  view_token_hash TEXT
) STRICT;

-- Lists order by (created_at, rowid): the rowid, implicit in every index, breaks
-- ties within a millisecond in insertion order.
CREATE INDEX IF NOT EXISTS rooms_by_created ON rooms (created_at);
CREATE INDEX IF NOT EXISTS open_rooms_by_created ON rooms (created_at) WHERE locked = 0;

-- Agent ids are unique within a room, not across rooms.
CREATE TABLE IF NOT EXISTS agents (
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  id TEXT NOT NULL,
  name TEXT NOT NULL,
  role TEXT NOT NULL,
  joined_at INTEGER NOT NULL,
  meta TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'active',
  last_seen INTEGER NOT NULL,
  token_hash TEXT,
  PRIMARY KEY (room_id, id)
) STRICT;

CREATE INDEX IF NOT EXISTS agents_by_joined ON agents (room_id, joined_at);
CREATE UNIQUE INDEX IF NOT EXISTS agents_by_token ON agents (token_hash)
  WHERE token_hash IS NOT NULL;

-- AUTOINCREMENT: ids only grow and are never reused, even after deletes.
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  from_agent TEXT,
  to_agent TEXT,
  kind TEXT NOT NULL,
  body TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  reply_to INTEGER,
  claimed_by TEXT,
  claimed_at INTEGER,
  lease_expires_at INTEGER,
  -- The room's rev at the last claim or release: streams on other instances read the
  -- claims changed since the rev they saw.
  claim_rev INTEGER
  -- Added by migration 2 (MIGRATIONS in db.ts), on new databases too: attempts
  -- (claims so far), max_attempts, done_at and done_by (the task lifecycle).
) STRICT;

CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room_id, id);
CREATE INDEX IF NOT EXISTS messages_by_room_kind ON messages (room_id, kind, id);
CREATE INDEX IF NOT EXISTS messages_by_room_from ON messages (room_id, from_agent, id);
CREATE INDEX IF NOT EXISTS messages_by_room_to ON messages (room_id, to_agent, id);
CREATE INDEX IF NOT EXISTS messages_by_reply ON messages (reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_leased ON messages (room_id, lease_expires_at)
  WHERE lease_expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_claim_rev ON messages (room_id, claim_rev)
  WHERE claim_rev IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_held ON messages (room_id, id)
  WHERE claimed_by IS NOT NULL;

-- An entry whose expires_at has passed reads as absent everywhere.
CREATE TABLE IF NOT EXISTS state (
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT NOT NULL,
  version INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  expires_at INTEGER,
  PRIMARY KEY (room_id, scope, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS state_expiring ON state (expires_at) WHERE expires_at IS NOT NULL;

-- The first answer to each Idempotency-Key, replayed for repeats; `request` is a hash
-- of the method, path and body, so a key reused for another request is refused.
CREATE TABLE IF NOT EXISTS idempotency (
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  key TEXT NOT NULL,
  request TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  status INTEGER,
  response TEXT,
  PRIMARY KEY (room_id, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS idempotency_by_age ON idempotency (created_at);

-- Never holds a row: a batch inserts NULL here when a write's rules refuse it (or a
-- statement it needed changed nothing), and the NOT NULL failure rolls it all back.
CREATE TABLE IF NOT EXISTS batch_guard (ok INTEGER NOT NULL) STRICT;

-- Posting a message counts as being seen (max: instances' clocks may differ a little).
CREATE TRIGGER IF NOT EXISTS messages_insert_rev AFTER INSERT ON messages BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = NEW.room_id;
  UPDATE agents SET last_seen = max(last_seen, NEW.created_at)
    WHERE room_id = NEW.room_id AND id = NEW.from_agent;
END;

CREATE TRIGGER IF NOT EXISTS messages_update_rev AFTER UPDATE ON messages BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = NEW.room_id;
END;

CREATE TRIGGER IF NOT EXISTS state_insert_rev AFTER INSERT ON state BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = NEW.room_id;
END;

CREATE TRIGGER IF NOT EXISTS state_update_rev AFTER UPDATE ON state BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = NEW.room_id;
END;

CREATE TRIGGER IF NOT EXISTS state_delete_rev AFTER DELETE ON state BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = OLD.room_id;
END;

CREATE TRIGGER IF NOT EXISTS agents_insert_rev AFTER INSERT ON agents BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = NEW.room_id;
END;

CREATE TRIGGER IF NOT EXISTS agents_update_rev AFTER UPDATE OF status ON agents BEGIN
  UPDATE rooms SET rev = rev + 1 WHERE id = NEW.room_id;
END;

INSERT INTO schema_version (id, version) VALUES (1, 1) ON CONFLICT (id) DO NOTHING;
