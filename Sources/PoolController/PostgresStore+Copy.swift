import Foundation
import GRDB
import PostgresNIO

/// Moving a pool from SQLite to PostgreSQL: every row of the SQLite
/// database, with the same ids, into an empty PostgreSQL database.
extension PostgresStore {
    /// The tables in an order their references allow.
    static let copiedTables = [
        "user", "appliance", "flavor", "image", "wisp", "template", "instance", "action", "reservation", "instanceUser",
        "timelineEntry", "signingKey", "sshKey",
    ]

    /// Copies every row of `source` into this database, which must hold no
    /// pool yet, in one transaction (a failure leaves it empty). Tokens,
    /// the signing key and ids come along, so agents and users carry on
    /// unchanged. The number of rows copied per table, in copy order.
    public func copyRows(from source: SQLiteStore) async throws -> [CopiedTable] {
        try await write { session in
            guard try await session.row("SELECT 1 FROM \"user\" LIMIT 1") == nil else {
                throw PoolError.conflict("the PostgreSQL database holds a pool already; copy into an empty one (a new database, migrated)")
            }
            var copied: [CopiedTable] = []
            for table in Self.copiedTables {
                var types: [String: String] = [:]
                for row in try await session.rows(
                    """
                    SELECT column_name, data_type FROM information_schema.columns
                    WHERE table_schema = current_schema() AND table_name = \(table.lowercased())
                    """)
                {
                    types[try row.get("column_name")] = try row.get("data_type")
                }
                // In rowid order: actions keep their order (their `seq` is given as they arrive).
                let rows = try await source.database.read { db in
                    try GRDB.Row.fetchAll(db, sql: "SELECT * FROM \(table.quotedDatabaseIdentifier) ORDER BY rowid")
                }
                for (number, row) in rows.enumerated() {
                    var columns: [String] = []
                    var binds = PostgresBindings()
                    for (column, value) in row {
                        guard let type = types[column.lowercased()] else {
                            throw PoolError.storage("the SQLite table \(table) has a column \(column) the PostgreSQL schema lacks")
                        }
                        columns.append("\"\(column.lowercased())\"")
                        do {
                            try Self.bind(value, as: type, into: &binds)
                        } catch {
                            throw PoolError.storage("row \(number + 1) of table \(table): column \(column) does not convert to \(type)")
                        }
                    }
                    let placeholders = (1...max(1, columns.count)).map { "$\($0)" }.joined(separator: ", ")
                    try await session.execute(
                        PostgresQuery(
                            unsafeSQL: "INSERT INTO \"\(table.lowercased())\" (\(columns.joined(separator: ", "))) VALUES (\(placeholders))",
                            binds: binds))
                }
                // New rows continue after the copied ids.
                if types["id"] == "bigint", table != "signingKey" {
                    try await session.execute(
                        PostgresQuery(
                            unsafeSQL: """
                                SELECT setval(pg_get_serial_sequence('"\(table.lowercased())"', 'id'),
                                GREATEST((SELECT MAX(id) FROM "\(table.lowercased())"), 1))
                                """))
                }
                copied.append(CopiedTable(table: table, rows: rows.count))
            }
            return copied
        }
    }

    /// How many rows of a table were copied.
    public struct CopiedTable: Sendable, Equatable {
        public var table: String
        public var rows: Int
    }

    /// Binds a SQLite value as the PostgreSQL column's type.
    private static func bind(_ value: DatabaseValue, as type: String, into binds: inout PostgresBindings) throws {
        struct Unconvertible: Error {}
        if value.isNull { return binds.appendNull() }
        switch type {
        case "bigint":
            guard let number = Int64.fromDatabaseValue(value) else { throw Unconvertible() }
            binds.append(Int(number))
        case "boolean":
            guard let flag = Bool.fromDatabaseValue(value) else { throw Unconvertible() }
            binds.append(flag)
        case "timestamp with time zone":
            guard let date = Date.fromDatabaseValue(value) else { throw Unconvertible() }
            binds.append(date)
        case "double precision":
            guard let number = Double.fromDatabaseValue(value) else { throw Unconvertible() }
            binds.append(number)
        case "bytea":
            guard let data = Data.fromDatabaseValue(value) else { throw Unconvertible() }
            try binds.append(data)
        default:
            guard let text = String.fromDatabaseValue(value) else { throw Unconvertible() }
            binds.append(text)
        }
    }
}
