-- Applied on every cold start; every statement is idempotent. Times are integer
-- milliseconds since the epoch (compared for TTLs and leases), JSON values are stored
-- as JSON.stringify text and parsed on read.

CREATE TABLE IF NOT EXISTS schema_version (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  version INTEGER NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS rooms (
  id TEXT PRIMARY KEY,
  created_at INTEGER NOT NULL,
  meta TEXT NOT NULL
) STRICT;

-- Lists order by (created_at, rowid): the rowid, implicit in every index, breaks
-- ties within a millisecond in insertion order.
CREATE INDEX IF NOT EXISTS rooms_by_created ON rooms (created_at);

-- Agent ids are unique within a room, not across rooms.
CREATE TABLE IF NOT EXISTS agents (
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  id TEXT NOT NULL,
  name TEXT NOT NULL,
  role TEXT NOT NULL,
  joined_at INTEGER NOT NULL,
  meta TEXT NOT NULL,
  PRIMARY KEY (room_id, id)
) STRICT;

CREATE INDEX IF NOT EXISTS agents_by_joined ON agents (room_id, joined_at);

-- AUTOINCREMENT: ids only grow and are never reused, even after deletes.
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  from_agent TEXT,
  to_agent TEXT,
  kind TEXT NOT NULL,
  body TEXT NOT NULL,
  created_at INTEGER NOT NULL
) STRICT;

CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room_id, id);
CREATE INDEX IF NOT EXISTS messages_by_room_kind ON messages (room_id, kind, id);

CREATE TABLE IF NOT EXISTS state (
  room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  value TEXT NOT NULL,
  version INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  PRIMARY KEY (room_id, scope, key)
) STRICT, WITHOUT ROWID;

INSERT INTO schema_version (id, version) VALUES (1, 1) ON CONFLICT (id) DO NOTHING;
