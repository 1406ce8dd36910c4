import Foundation
import GRDB

extension SQLiteStore {
    /// Wakes the held check-ins of the appliances whose actions another
    /// process committed (`corral pool instance action ...` writes the file
    /// itself), until cancelled. A connection of its own reads `PRAGMA
    /// data_version` every `interval`: the number changes when any other
    /// connection commits. Then the appliances of the pending actions added
    /// since its last look are signalled. The pool's own commits wake their
    /// check-ins at once (`NewActionObserver`); seeing them again here only
    /// costs a held check-in one more look at its pending actions.
    public func followOtherWriters(every interval: Duration = .milliseconds(200)) async throws {
        var configuration = Configuration()
        configuration.readonly = true
        configuration.busyMode = .timeout(10)
        let connection = try DatabaseQueue(path: database.path, configuration: configuration)
        var (version, newest) = try await connection.read { db in
            (try Int.fetchOne(db, sql: "PRAGMA data_version") ?? 0, try Int64.fetchOne(db, sql: "SELECT max(rowid) FROM action") ?? 0)
        }
        while true {
            try await Task.sleep(for: interval)
            let (seenVersion, seenNewest) = (version, newest)
            let look = try? await connection.read { db -> (version: Int, newest: Int64, appliances: [String]) in
                let now = try Int.fetchOne(db, sql: "PRAGMA data_version") ?? 0
                guard now != seenVersion else { return (now, seenNewest, []) }
                let appliances = try String.fetchAll(
                    db,
                    sql: """
                        SELECT DISTINCT appliance.name FROM action JOIN appliance ON appliance.id = action.applianceID
                        WHERE action.rowid > ? AND action.doneAt IS NULL
                        """,
                    arguments: [seenNewest])
                // Lower when the newest rows were deleted: new ones may reuse their rowids.
                return (now, try Int64.fetchOne(db, sql: "SELECT max(rowid) FROM action") ?? 0, appliances)
            }
            guard let look else { continue }  // busy past the timeout: look again next time
            (version, newest) = (look.version, look.newest)
            for appliance in look.appliances { actionsChanged.signal(appliance) }
        }
    }
}
