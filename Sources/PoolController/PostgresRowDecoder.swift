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
/// of its name. Records are flat, so nothing nests.
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

        func contains(_ key: Key) -> Bool { row.row.contains(key.stringValue.lowercased()) }

        func decodeNil(forKey key: Key) throws -> Bool {
            let name = key.stringValue.lowercased()
            guard row.row.contains(name) else { return true }
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
