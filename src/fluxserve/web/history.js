// Turn history in IndexedDB (images kept as blobs: signed URLs expire), bounded to the newest LIMIT turns.
const DB = "fluxserve-playground";
const STORE = "turns";
const LIMIT = 50;

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

export class History {
  async db() {
    if (!this._db) {
      const open = indexedDB.open(DB, 1);
      open.onupgradeneeded = () => open.result.createObjectStore(STORE, { keyPath: "id" });
      this._db = request(open);
    }
    return this._db;
  }

  async tx(mode) {
    return (await this.db()).transaction(STORE, mode).objectStore(STORE);
  }

  async load() {
    const all = await request((await this.tx("readonly")).getAll());
    return all.sort((a, b) => a.created - b.created);
  }

  async save(turn) {
    await request((await this.tx("readwrite")).put(turn));
    const all = await this.load();
    const store = await this.tx("readwrite");
    for (const old of all.slice(0, Math.max(0, all.length - LIMIT))) store.delete(old.id);
  }

  async clear() {
    await request((await this.tx("readwrite")).clear());
  }
}
