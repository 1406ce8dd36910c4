import Foundation
import PostgresNIO

extension PostgresStore.Row {
    /// The row as a record: each property from the column of its name.
    func decode<Record: Decodable>(_ type: Record.Type) throws -> Record {
        try Record(from: PostgresRowDecoder(row: self))
    }
}

/// Decodes a record from one row: a property of a type PostgreSQL decodes
/// (text, integers, booleans, doubles, timestamps, arrays) from the column
/// of its name. Records are flat, so nothing nests. A column the query did
/// not return is an error, for optional properties too.
struct PostgresRowDecoder: Decoder {
    let row: PostgresStore.Row
    var codingPath: [any CodingKey] { [] }
    var userInfo: [CodingUserInfoKey: Any] { [:] }

    func container<Key: CodingKey>(keyedBy type: Key.Type) throws -> KeyedDecodingContainer<Key> {
        KeyedDecodingContainer(Columns<Key>(row: row))
    }

    func unkeyedContainer() throws -> any UnkeyedDecodingContainer {
        throw DecodingError.typeMismatch([Any].self, .init(codingPath: [], debugDescription: "a row decodes only into a keyed record"))
    }

    func singleValueContainer() throws -> any SingleValueDecodingContainer {
        throw DecodingError.typeMismatch(Any.self, .init(codingPath: [], debugDescription: "a row decodes only into a keyed record"))
    }

    struct Columns<Key: CodingKey>: KeyedDecodingContainerProtocol {
        let row: PostgresStore.Row
        var codingPath: [any CodingKey] { [] }
        var allKeys: [Key] { [] }

        /// Every property is a column the query must answer with: an
        /// optional one too (a missing column is an error, not nil).
        func contains(_ key: Key) -> Bool { true }

        func decodeNil(forKey key: Key) throws -> Bool {
            let name = key.stringValue.lowercased()
            guard row.row.contains(name) else {
                throw PoolError.storage("the pool database answered without column '\(key.stringValue)'")
            }
            return row.row[name].bytes == nil
        }

        func decode<T: Decodable>(_ type: T.Type, forKey key: Key) throws -> T {
            guard let decodable = type as? any PostgresDecodable.Type else {
                throw DecodingError.typeMismatch(
                    type, .init(codingPath: [key], debugDescription: "column '\(key.stringValue)': \(type) is not a PostgreSQL type"))
            }
            guard let value = try column(key.stringValue, as: decodable) as? T else {
                throw DecodingError.typeMismatch(type, .init(codingPath: [key], debugDescription: "column '\(key.stringValue)'"))
            }
            return value
        }

        private func column<P: PostgresDecodable>(_ name: String, as type: P.Type) throws -> P { try row.get(name, as: type) }

        func nestedContainer<NestedKey: CodingKey>(keyedBy type: NestedKey.Type, forKey key: Key) throws -> KeyedDecodingContainer<NestedKey> {
            throw DecodingError.typeMismatch(type, .init(codingPath: [key], debugDescription: "records are flat"))
        }

        func nestedUnkeyedContainer(forKey key: Key) throws -> any UnkeyedDecodingContainer {
            throw DecodingError.typeMismatch([Any].self, .init(codingPath: [key], debugDescription: "records are flat"))
        }

        func superDecoder() throws -> any Decoder { PostgresRowDecoder(row: row) }
        func superDecoder(forKey key: Key) throws -> any Decoder { PostgresRowDecoder(row: row) }
    }
}
