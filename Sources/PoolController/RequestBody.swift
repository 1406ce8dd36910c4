import Foundation
import Hummingbird
import PoolAPI

/// Why a request body could not be read, naming the field at fault.
struct RequestBodyError: Error, CustomStringConvertible {
    var description: String
}

/// The most a request body may hold: an appliance's report, with up to
/// 1000 console lines of at most 1 KiB.
let maximumRequestBody = 1 << 20

/// The most the bodies read before their sender is known may hold: an
/// appliance's authorization, whose token is inside the body.
let maximumAuthorizationBody = 16 << 10

/// The most a check-in may hold: 1000 instances and their acknowledged actions.
let maximumCheckInBody = 256 << 10

/// The most a user's request body may hold.
let maximumUserBody = 128 << 10

/// The whole request body, up to `limit` bytes; a larger one is a 413.
func collectBody(_ request: Request, upTo limit: Int = maximumRequestBody) async throws -> ByteBuffer {
    var request = request
    do {
        return try await request.collectBody(upTo: limit)
    } catch {
        throw Refusal(.contentTooLarge, "the body is larger than \(limit) bytes")
    }
}

/// Decodes a JSON body, turning decoding failures into messages that name
/// the field and what it should be.
func decodeJSON<T: Decodable>(_ type: T.Type, from buffer: ByteBuffer) throws -> T {
    do {
        return try JSONDecoder().decode(T.self, from: Data(buffer.readableBytesView))
    } catch let error as DecodingError {
        throw RequestBodyError(description: describe(error))
    }
}

func describe(_ error: DecodingError) -> String {
    func path(_ codingPath: [any CodingKey], _ last: (any CodingKey)? = nil) -> String {
        let keys = (codingPath + (last.map { [$0] } ?? [])).map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
        return keys.joined(separator: ".").replacingOccurrences(of: ".[", with: "[")
    }
    switch error {
    case .keyNotFound(let key, let context):
        return "missing field '\(path(context.codingPath, key))'"
    case .typeMismatch(let type, let context):
        return "field '\(path(context.codingPath))' must be \(typeName(type))"
    case .valueNotFound(let type, let context):
        return "field '\(path(context.codingPath))' must be \(typeName(type)), not null"
    case .dataCorrupted(let context):
        return context.codingPath.isEmpty
            ? "the body is not valid JSON" : "field '\(path(context.codingPath))' is invalid: \(context.debugDescription)"
    @unknown default:
        return "the body could not be read"
    }
}

private func typeName(_ type: Any.Type) -> String {
    switch type {
    case is String.Type: "a string"
    case is Bool.Type: "true or false"
    case is Int.Type, is Int64.Type: "a whole number"
    case is Double.Type: "a number"
    default: "\(type)".hasPrefix("Array") ? "a list" : "an object"
    }
}

/// A `/v1` body decoded as `T`. A body that is not a JSON object, a field
/// `T` does not have (at any depth), a missing field or one of the wrong
/// type is a 400 naming the field.
func decodeStrictBody<T: StrictRequestBody>(_ type: T.Type, from buffer: ByteBuffer) throws -> T {
    let data = Data(buffer.readableBytesView)
    guard let fields = try? JSONDecoder().decode(ObjectFields.self, from: data) else {
        throw Refusal(.badRequest, "the body must be a JSON object")
    }
    try fields.refuseUnknown(by: T.self, prefix: "")
    do {
        return try JSONDecoder().decode(T.self, from: data)
    } catch DecodingError.dataCorrupted(let context) where context.codingPath.isEmpty {
        // The JSON is valid, so a number did not fit its field (the decoder names none).
        guard let field = fields.firstUnfitNumber() else { throw Refusal(.badRequest, "the body could not be read: \(context.debugDescription)") }
        throw Refusal(.badRequest, "field '\(field)' must be a whole number in its range")
    } catch let error as DecodingError {
        throw Refusal(.badRequest, describe(error))
    }
}

/// The field names of a JSON object, with those of the objects inside it.
private struct ObjectFields: Decodable {
    var fields: [String: ObjectFields?] = [:]

    struct Name: CodingKey {
        var stringValue: String
        var intValue: Int? { nil }
        init(stringValue: String) { self.stringValue = stringValue }
        init?(intValue: Int) { nil }
    }

    /// Its fields holding numbers that are no `Int` (fractions, too large).
    var unfitNumbers: [String] = []
    /// Its fields holding `null`.
    var nulls: [String] = []

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: Name.self)
        for key in container.allKeys {
            let inner: ObjectFields? = try? container.decode(ObjectFields.self, forKey: key)
            fields.updateValue(inner, forKey: key.stringValue)  // kept when nil: the field is there
            if (try? container.decode(Double.self, forKey: key)) != nil, (try? container.decode(Int.self, forKey: key)) == nil {
                unfitNumbers.append(key.stringValue)
            }
            if (try? container.decodeNil(forKey: key)) == true { nulls.append(key.stringValue) }
        }
        unfitNumbers.sort()
        nulls.sort()
    }

    func firstUnfitNumber(prefix: String = "") -> String? {
        if let name = unfitNumbers.first { return prefix + name }
        for (name, inner) in fields.sorted(by: { $0.key < $1.key }) {
            if let found = inner?.firstUnfitNumber(prefix: prefix + name + ".") { return found }
        }
        return nil
    }

    func refuseUnknown(by type: any StrictRequestBody.Type, prefix: String) throws {
        let allowed = type.fieldNames
        try BodyField.only(fields.keys.sorted(), allowed: allowed, required: [], prefix: prefix)
        // Decoding reads a null as a field left out: refused where it means nothing.
        if let null = nulls.first(where: { !type.nullableFields.contains($0) }) {
            throw Refusal(.badRequest, "field '\(prefix)\(null)' must not be null; leave it out instead")
        }
        for (name, nested) in type.objectFields.sorted(by: { $0.key < $1.key }) {
            if let inner = fields[name] ?? nil { try inner.refuseUnknown(by: nested, prefix: prefix + name + ".") }
        }
    }
}

/// Checks of a decoded body's values beyond their types, each refusal
/// naming the field and what it must be.
enum BodyField {
    /// A non-empty string of at most `maxBytes` bytes, one of `choices` if given.
    static func text(_ value: String?, _ field: String, maxBytes: Int = 64, choices: [String]? = nil) throws -> String? {
        guard let value else { return nil }
        guard !value.isEmpty, value.utf8.count <= maxBytes else {
            throw Refusal(.badRequest, "field '\(field)' must be a non-empty string of at most \(maxBytes) bytes")
        }
        if let choices, !choices.contains(value) {
            throw Refusal(
                .badRequest, "field '\(field)' must be one of \(choices.map { "'\($0)'" }.joined(separator: ", ")), not '\(value)'")
        }
        return value
    }

    /// A list of at most 100 names or ids of at most 64 bytes each.
    static func names(_ value: [String]?, _ field: String) throws -> [String]? {
        guard let value else { return nil }
        guard value.count <= 100, value.allSatisfy({ $0.utf8.count <= 64 }) else {
            throw Refusal(.badRequest, "field '\(field)' must be a list of at most 100 ids or names (strings of at most 64 bytes)")
        }
        return value
    }

    /// A whole number in `range`.
    static func number(_ value: Int?, _ field: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let value else { return nil }
        guard range.contains(value) else {
            throw Refusal(.badRequest, "field '\(field)' must be a whole number from \(range.lowerBound) to \(range.upperBound)")
        }
        return value
    }

    /// An http or https URL with a host, of at most 2048 bytes.
    static func httpURL(_ value: String, _ field: String) throws -> String {
        guard value.utf8.count <= 2048, let url = URL(string: value), ["http", "https"].contains(url.scheme?.lowercased() ?? ""),
            let host = url.host, !host.isEmpty
        else { throw Refusal(.badRequest, "field '\(field)' must be an http or https URL of at most 2048 bytes") }
        return value
    }

    /// Refuses the fields given (`present`) that `allowed` does not list,
    /// and the `required` ones missing, e.g. a task's fields for its kind.
    static func only(_ present: [String], allowed: [String], required: [String], prefix: String) throws {
        if let unknown = present.first(where: { !allowed.contains($0) }) {
            throw Refusal(
                .badRequest,
                "unknown field '\(prefix)\(unknown.prefix(64))'; allowed: \(allowed.map { "'\(prefix)\($0)'" }.joined(separator: ", "))")
        }
        if let missing = required.first(where: { !present.contains($0) }) {
            throw Refusal(.badRequest, "missing field '\(prefix)\(missing)'")
        }
    }
}
