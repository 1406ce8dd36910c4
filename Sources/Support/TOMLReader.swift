import Foundation
import TOMLKit

/// A configuration file that cannot be used, naming the key (as
/// `file: section.key`) and what it must be.
public struct ConfigurationError: Error, Equatable, CustomStringConvertible {
    public var field: String
    public var reason: String

    public init(field: String, reason: String) {
        self.field = field
        self.reason = reason
    }

    public var description: String { "\(field): \(reason)" }
}

/// Typed reads from a TOML configuration file whose keys all sit in known
/// sections, with errors naming `section.key`.
public struct TOMLReader {
    let table: TOMLTable
    let source: String
    let example: String

    /// Parses `text` (from `source`, named in errors) and checks that every
    /// section and key is one of `known`; `example` names the example file
    /// errors point to, and `mainSection` the section they suggest.
    public init(_ text: String, source: String, known: [String: Set<String>], example: String, mainSection: String) throws {
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigurationError(
                field: source, reason: "not valid TOML at line \(error.source.begin.line): \(error.description)")
        }
        self.source = source
        self.example = example
        try checkKeys(known, mainSection: mainSection)
    }

    /// Reads the file at `path`.
    public static func load(path: String, known: [String: Set<String>], example: String, mainSection: String) throws -> TOMLReader {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigurationError(field: path, reason: "cannot read the configuration file (\(error.localizedDescription))")
        }
        return try TOMLReader(text, source: path, known: known, example: example, mainSection: mainSection)
    }

    private func checkKeys(_ known: [String: Set<String>], mainSection: String) throws {
        for section in table.keys {
            guard let inner = table[section]?.table else {
                throw ConfigurationError(
                    field: "\(source): \(section)",
                    reason: "keys belong in a section such as [\(mainSection)]; see \(example)")
            }
            guard let keys = known[section] else {
                throw ConfigurationError(
                    field: "\(source): [\(section)]",
                    reason: "unknown section; the sections are \(known.keys.sorted().map { "[\($0)]" }.joined(separator: ", "))")
            }
            for key in inner.keys where !keys.contains(key) {
                throw ConfigurationError(
                    field: "\(source): \(section).\(key)",
                    reason: "unknown key; [\(section)] takes \(keys.sorted().joined(separator: ", "))")
            }
        }
    }

    private func value(_ section: String, _ key: String) -> TOMLValueConvertible? {
        table[section]?.table?[key]
    }

    /// An error about `section.key`.
    public func invalid(_ section: String, _ key: String, _ reason: String) -> ConfigurationError {
        ConfigurationError(field: "\(source): \(section).\(key)", reason: reason)
    }

    public func string(_ section: String, _ key: String) throws -> String? {
        guard let value = value(section, key) else { return nil }
        guard let string = value.string else { throw invalid(section, key, "must be a string") }
        return string
    }

    /// A string that must be one of `choices`.
    public func choice(_ section: String, _ key: String, of choices: [String]) throws -> String? {
        guard let string = try string(section, key) else { return nil }
        guard choices.contains(string) else {
            throw invalid(section, key, "must be one of \(choices.map { "\"\($0)\"" }.joined(separator: ", ")) (it is \"\(string)\")")
        }
        return string
    }

    public func int(_ section: String, _ key: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let value = value(section, key) else { return nil }
        guard let int = value.int else { throw invalid(section, key, "must be an integer") }
        guard range.contains(int) else {
            throw invalid(section, key, "must be between \(range.lowerBound) and \(range.upperBound) (it is \(int))")
        }
        return int
    }

    public func bool(_ section: String, _ key: String) throws -> Bool? {
        guard let value = value(section, key) else { return nil }
        guard let bool = value.bool else { throw invalid(section, key, "must be true or false") }
        return bool
    }

    public func ints(_ section: String, _ key: String) throws -> [Int]? {
        guard let value = value(section, key) else { return nil }
        guard let array = value.array else { throw invalid(section, key, "must be an array of integers") }
        return try array.map { element in
            guard let int = element.int else { throw invalid(section, key, "must be an array of integers") }
            return int
        }
    }

    public func strings(_ section: String, _ key: String) throws -> [String]? {
        guard let value = value(section, key) else { return nil }
        guard let array = value.array else { throw invalid(section, key, "must be an array of strings") }
        return try array.map { element in
            guard let string = element.string else { throw invalid(section, key, "must be an array of strings") }
            return string
        }
    }
}
