import Foundation
import Testing
import Yams

/// Any JSON value, decoded without Foundation's number/boolean ambiguity.
indirect enum JSONValue: Decodable, Equatable {
    case null, bool(Bool), int(Int), double(Double), string(String), array([JSONValue]), object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() { self = .null }
        else if let value = try? container.decode(Bool.self) { self = .bool(value) }
        else if let value = try? container.decode(Int.self) { self = .int(value) }
        else if let value = try? container.decode(Double.self) { self = .double(value) }
        else if let value = try? container.decode(String.self) { self = .string(value) }
        else if let value = try? container.decode([JSONValue].self) { self = .array(value) }
        else { self = .object(try container.decode([String: JSONValue].self)) }
    }
}

/// The pool's OpenAPI document and a checker for the JSON-Schema subset it
/// uses (type, properties, required, additionalProperties: false, items,
/// enum, nullable, minimum, $ref).
struct OpenAPISpec {
    let root: [String: Any]

    init(yaml: String) throws {
        root = try #require(try Yams.load(yaml: yaml) as? [String: Any])
    }

    var paths: [String: Any] { root["paths"] as? [String: Any] ?? [:] }

    /// Every documented (path, method, status).
    var operations: Set<String> {
        var all: Set<String> = []
        for (path, item) in paths {
            for (method, operation) in item as? [String: Any] ?? [:] {
                for status in ((operation as? [String: Any])?["responses"] as? [String: Any] ?? [:]).keys {
                    all.insert("\(method.uppercased()) \(path) \(status)")
                }
            }
        }
        return all
    }

    /// The documented reply for a path template, method and status.
    func response(path: String, method: String, status: Int) -> [String: Any]? {
        let operation = (paths[path] as? [String: Any])?[method.lowercased()] as? [String: Any]
        return (operation?["responses"] as? [String: Any])?["\(status)"] as? [String: Any]
    }

    func schema(_ response: [String: Any], contentType: String) -> [String: Any]? {
        ((response["content"] as? [String: Any])?[contentType] as? [String: Any])?["schema"] as? [String: Any]
    }

    /// What is wrong with `value` against `schema`; empty when it conforms.
    func problems(_ value: JSONValue, _ schema: [String: Any], at path: String = "$") -> [String] {
        if let reference = schema["$ref"] as? String {
            let name = String(reference.split(separator: "/").last ?? "")
            guard let target = ((root["components"] as? [String: Any])?["schemas"] as? [String: Any])?[name] as? [String: Any] else {
                return ["\(path): unresolved \(reference)"]
            }
            return problems(value, target, at: path)
        }
        if value == .null { return schema["nullable"] as? Bool == true ? [] : ["\(path): null is not allowed"] }
        var found: [String] = []
        if let allowed = schema["enum"] as? [Any] {
            let matches = allowed.contains { candidate in
                switch value {
                case .string(let string): (candidate as? String) == string
                case .int(let int): (candidate as? Int) == int
                default: false
                }
            }
            if !matches { found.append("\(path): \(value) is not one of \(allowed)") }
        }
        switch (schema["type"] as? String, value) {
        case ("object", .object(let object)):
            let properties = schema["properties"] as? [String: Any] ?? [:]
            for required in schema["required"] as? [String] ?? [] where object[required] == nil {
                found.append("\(path): missing required '\(required)'")
            }
            for (key, member) in object {
                if let property = properties[key] as? [String: Any] {
                    found += problems(member, property, at: "\(path).\(key)")
                } else if schema["additionalProperties"] as? Bool == false {
                    found.append("\(path): undocumented property '\(key)'")
                }
            }
        case ("array", .array(let elements)):
            if let items = schema["items"] as? [String: Any] {
                for (index, element) in elements.enumerated() { found += problems(element, items, at: "\(path)[\(index)]") }
            }
        case ("string", .string): break
        case ("boolean", .bool): break
        case ("integer", .int(let int)):
            if let minimum = schema["minimum"] as? Int, int < minimum { found.append("\(path): \(int) is below \(minimum)") }
        case ("number", .int), ("number", .double): break
        case (let type?, _): found.append("\(path): \(value) is not of type \(type)")
        case (nil, _): found.append("\(path): the schema names no type")
        }
        return found
    }
}
