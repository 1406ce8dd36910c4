import ArgumentParser
import Foundation
import PoolAPI

extension Corral {
    /// `corral keys`: the caller's SSH public keys in the pool.
    struct KeysCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "keys",
            abstract: "Your SSH public keys, which your instances get (see `corral instances create --ssh-key`).",
            discussion: """
                The pool is --pool, else CORRAL_POOL_URL, else http://127.0.0.1:8080; your token is CORRAL_TOKEN, \
                else the file --token-file or CORRAL_TOKEN_FILE names (mode 0600).
                """,
            subcommands: [List.self, Add.self, Delete.self])

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List your keys.")
            @OptionGroup var api: UserAPIOptions

            func run() async throws {
                KeysCommand.show(try await api.call(.GET, "/v1/ssh-key", as: [ServerSSHKey].self), api: api)
            }
        }

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Add a public key (a .pub file) under a name.")
            @OptionGroup var api: UserAPIOptions
            @Argument(help: "The key's name (lowercase letters, digits and '-').") var name: String
            @Option(help: "The public key file, e.g. ~/.ssh/id_ed25519.pub.") var file: String

            func run() async throws {
                let text = readTextFile(file, option: "--file", maxBytes: 16 * 1024)
                if text.contains("PRIVATE KEY") { fail("--file \(file) is a private key; give its .pub file") }
                let added = try await api.call(
                    .POST, "/v1/ssh-key", body: ServerSSHKeyCreation(name: name, publicKey: text), as: [ServerSSHKey].self)
                KeysCommand.show(added, api: api)
            }
        }

        struct Delete: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Delete one of your keys (instances that have it keep it).")
            @OptionGroup var api: UserAPIOptions
            @Argument(help: "The key's id or name.") var key: String

            func run() async throws {
                let path = "/v1/ssh-key/" + (key.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(["/"])) ?? key)
                KeysCommand.show(try await api.call(.DELETE, path, as: [ServerSSHKey].self), api: api)
            }
        }

        static func show(_ keys: [ServerSSHKey], api: UserAPIOptions) {
            if api.json { return (try? printJSON(keys)) ?? () }
            var table = Table(header: ["ID", "NAME", "FINGERPRINT", "TYPE", "CREATED"])
            for key in keys {
                table.rows.append([key.id, key.name, key.fingerprint, String(key.publicKey.prefix { $0 != " " }), key.created])
            }
            print(table.render())
        }
    }
}
